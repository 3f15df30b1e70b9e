"""LayerNorm over the last dim, alone or fused with the residual add before it: one Triton kernel.

The UNet's transformer blocks normalise [B, N, C] token rows (C = 320, 640, 1280 in SD 1.x / 2.x / SDXL)
three times each, and the second and third norms read the residual stream right after an add
(`x = x + attn(...)`). In torch that is two launches and two passes: the add (read x and the update,
write s) then the norm (read s, write y). `add_layer_norm` does both in one pass: it reads x and the
update once, writes the new residual stream s = x + update and y = layer_norm(s).

Design (forward only, inference). A program owns BLOCK_M whole rows of BLOCK_C = next_pow2(C) lanes, held
in registers: statistics are two-pass over the registers (mean, then the mean of squared deviations,
never E[x^2] - E[x]^2), so a row is read from memory once. BLOCK_M fills a tile of TILE_ELEMENTS, then
shrinks while the grid would leave SMs idle (the 8x8 level of SD 1.5 has only 128 rows at batch 2).

Numerics. fp16, bf16 and fp32 in, statistics and affine in fp32, cast on store. The sum s is rounded to
the storage dtype first and normalised as stored, so y is exactly layer_norm(s) of the returned s (and s
is bit for bit what torch's `x + update` gives).

Layout. Tensors are addressed as [B, N, C] through their strides (leading dims flattened into B where they
can be, else copied), so a token stream that is a strided view of an NCHW activation is read in place; in
the UNet's channels_last stream and nn.Linear's outputs the column stride is 1, which Triton's JIT
specialises into contiguous vector loads. y is a new row-major tensor; s keeps x's layout, as `x + update`.

Registered as the torch custom ops `sd_kernels::layer_norm` and `sd_kernels::add_layer_norm` (functional,
with fake implementations, so CUDA graphs capture them and meta tensors trace through them), with
`torch.library.custom_op` as kernels/group_norm.py explains. They run on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import aot

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program: 4096 = 32 per thread at 4 warps, as kernels/group_norm.py's MAX_TILE (enough
# bytes in flight to cover HBM latency; the fused kernel holds x, the update and s: no spills, see test_sass).
TILE_ELEMENTS = 4096
NUM_WARPS = 4
# Widest row: 8192 lanes at 8 warps is the same 32 elements per thread. Wider rows are rejected by
# layer_norm (the UNet's widest is 1280); the triton backend sends them to torch.
MAX_WIDTH = 8192
# Triton's JIT proves row alignment only for widths divisible by 16 (its integer specialisation); other
# rows load element by element, with more live addresses per thread, and run at twice the warps (at 4
# warps ptxas of triton 3.8 spilled width 1000 at BLOCK_M = 2; 8 compiles clean in 3.6 and 3.8).
ALIGNED_WIDTH = 16
# Fewest programs worth keeping when shrinking BLOCK_M: about two per SM of a 132-SM H100.
MIN_PROGRAMS = 256


@triton.jit
def _layer_norm_kernel(
    X,  # pointer to x, logical [B, N, C]: element (b, n, c) at b*stride_xb + n*stride_xn + c*stride_xc
    U,  # pointer to update, [B, N, C] through the stride_u* strides; unused unless HAS_UPDATE
    S,  # pointer to s = x + update, [B, N, C] through the stride_s* strides; unused unless HAS_UPDATE
    Y,  # pointer to y, the normalised [B, N, C] output, through the stride_y* strides
    W,  # pointer to weight [C], contiguous; unused unless HAS_WEIGHT
    B,  # pointer to bias [C], contiguous; unused unless HAS_BIAS
    n_rows,  # rows, B * N
    N,  # rows per batch item (tokens)
    C,  # row width: the normalised dim
    stride_xb,  # x: elements between batch items
    stride_xn,  # x: elements between rows (tokens) of one batch item
    stride_xc,  # x: elements between columns (1 in a channels_last or row-major stream)
    stride_ub,  # update: as x's three strides
    stride_un,
    stride_uc,
    stride_sb,  # s: as x's three strides
    stride_sn,
    stride_sc,
    stride_yb,  # y: as x's three strides
    stride_yn,
    stride_yc,
    eps,  # added to the variance before the reciprocal square root
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # lanes per row, a power of two >= C
    HAS_UPDATE: tl.constexpr,  # normalise s = x + update and write s
    HAS_WEIGHT: tl.constexpr,  # multiply by weight[c]
    HAS_BIAS: tl.constexpr,  # add bias[c]
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    # 64-bit offsets: batch * stride passes 2**31 at large batches of SDXL tokens.
    batch = (rows // N).to(tl.int64)[:, None]
    token = (rows % N).to(tl.int64)[:, None]
    x = tl.load(X + batch * stride_xb + token * stride_xn + cols[None, :] * stride_xc, mask=mask, other=0.0)
    if HAS_UPDATE:
        u = tl.load(U + batch * stride_ub + token * stride_un + cols[None, :] * stride_uc, mask=mask, other=0.0)
        # Rounded to the storage dtype, then normalised as stored: y is layer_norm of the s we return.
        x = (x.to(tl.float32) + u.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + batch * stride_sb + token * stride_sn + cols[None, :] * stride_sc, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + batch * stride_yb + token * stride_yn + cols[None, :] * stride_yc
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class LayerNormConfig:
    block_m: int  # rows per program
    block_c: int  # lanes per row, next_pow2(C)
    num_warps: int


def choose_config(n_rows: int, width: int) -> LayerNormConfig:
    """Whole rows per program filling TILE_ELEMENTS, halved while the grid has under MIN_PROGRAMS programs."""
    block_c = triton.next_power_of_2(width)
    block_m = max(1, TILE_ELEMENTS // block_c)
    while block_m > 1 and triton.cdiv(n_rows, block_m) < MIN_PROGRAMS:
        block_m //= 2
    num_warps = max(NUM_WARPS, block_c * NUM_WARPS // TILE_ELEMENTS)
    if width % ALIGNED_WIDTH:
        num_warps *= 2
    return LayerNormConfig(block_m=block_m, block_c=block_c, num_warps=num_warps)


def _check_inputs(x, update, weight, bias, eps, op: str) -> None:
    """Clear errors for bad input, before any kernel sees it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    width = x.shape[-1]
    if width > MAX_WIDTH:
        raise ValueError(f"{op}: the last dim of x is {width}; the kernel normalises rows of at most {MAX_WIDTH}")
    if update is not None:
        if not isinstance(update, torch.Tensor):
            raise TypeError(f"{op}: update must be a torch.Tensor, got {type(update).__name__}")
        if update.shape != x.shape or update.dtype != x.dtype or update.device != x.device:
            raise ValueError(
                f"{op}: update must match x in shape, dtype and device: update is {tuple(update.shape)} "
                f"{update.dtype} {update.device}, x is {tuple(x.shape)} {x.dtype} {x.device}"
            )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor or None, got {type(param).__name__}")
        if tuple(param.shape) != (width,):
            raise ValueError(f"{op}: {name} must have shape ({width},) for rows of {width}, got {tuple(param.shape)}")
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {param.dtype}; supported: {SUPPORTED_DTYPES}")
        if param.device != x.device:
            raise ValueError(f"{op}: {name} is on {param.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    if x.device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: x is on {x.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )


def _as_3d(t: torch.Tensor, output: str | None = None) -> torch.Tensor:
    """t [..., N, C] as [B, N, C], a view where the strides allow; else a contiguous copy of an input,
    and an error for an `output` (a copy would lose what the kernel writes)."""
    if t.dim() < 3:
        return t.view((1,) * (3 - t.dim()) + tuple(t.shape))
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:  # leading dims that do not flatten
        if output is not None:
            message = f"layer_norm.launch: the leading dims of {output} (strides {t.stride()}) do not flatten"
            raise ValueError(message) from None
        return t.contiguous().view(-1, *t.shape[-2:])


def launch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    y: torch.Tensor,
    update: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    config: LayerNormConfig | None = None,
) -> None:
    """Run the kernel on [..., C] tensors of one shape, any strides: y = layer_norm(x), or with `update`,
    s = x + update and y = layer_norm(s). `config` overrides the chosen one (tests use it)."""
    for name, t in (("y", y), ("update", update), ("s", s)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"layer_norm.launch: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if (update is None) != (s is None):
        raise ValueError("layer_norm.launch: update and s come together")
    if x.numel() == 0:
        return
    x3, y3 = _as_3d(x), _as_3d(y, "y")
    u3 = _as_3d(update) if update is not None else x3
    s3 = _as_3d(s, "s") if s is not None else y3
    batch, tokens, width = x3.shape
    n_rows = batch * tokens
    cfg = config or choose_config(n_rows, width)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _layer_norm_kernel[(triton.cdiv(n_rows, cfg.block_m),)](
            x3,
            u3,
            s3,
            y3,
            weight if weight is not None else x3,
            bias if bias is not None else x3,
            n_rows,
            tokens,
            width,
            *x3.stride(),
            *u3.stride(),
            *s3.stride(),
            *y3.stride(),
            float(eps),
            BLOCK_M=cfg.block_m,
            BLOCK_C=cfg.block_c,
            HAS_UPDATE=update is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            num_warps=cfg.num_warps,
        )


def _residual_like(x: torch.Tensor) -> torch.Tensor:
    """s is the residual stream: it keeps x's layout, as torch's `x + update` does (the tokens of an NCHW
    model's stream stay strided, a row-major stream stays row-major). Past 3 dims: row-major."""
    return torch.empty_like(x) if x.dim() <= 3 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("sd_kernels::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch(x, weight, bias, eps, y)
    return y


@_layer_norm_op.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("sd_kernels::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s, y = _residual_like(x), torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch(x, weight, bias, eps, y, update=update, s=s)
    return s, y


@_add_layer_norm_op.register_fake
def _add_layer_norm_fake(x, update, weight, bias, eps):
    return _residual_like(x), torch.empty(x.shape, dtype=x.dtype, device=x.device)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of x [..., C] over its last dim (statistics in fp32), a new contiguous tensor of x's dtype."""
    _check_inputs(x, None, weight, bias, eps, "layer_norm")
    return torch.ops.sd_kernels.layer_norm(x, weight, bias, float(eps))


def add_layer_norm(
    x: torch.Tensor,
    update: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + update (the new residual stream) and y = layer_norm(s), in one pass; new tensors."""
    _check_inputs(x, update, weight, bias, eps, "add_layer_norm")
    return torch.ops.sd_kernels.add_layer_norm(x, update, weight, bias, float(eps))


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    upcast: bool = True,
) -> torch.Tensor:
    """Pure-torch LayerNorm over the last dim. upcast=True computes in fp32 (fp64 stays fp64), then casts back."""
    compute = (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype
    y = F.layer_norm(
        x.to(compute),
        x.shape[-1:],
        weight.to(compute) if weight is not None else None,
        bias.to(compute) if bias is not None else None,
        eps,
    )
    return y.to(x.dtype)


def add_layer_norm_reference(
    x: torch.Tensor,
    update: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch: s = x + update in x's dtype (as the model adds), y = layer_norm_reference(s)."""
    s = x + update
    return s, layer_norm_reference(s, weight, bias, eps, upcast)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation list (tests/kernels/test_sass.py compiles each entry for sm_90).

# Token rows of the UNets' transformer levels at batch 1 and 2 (guided): SD 1.x 64..8, SD 2.1 768px
# 96..12, SDXL 1024px 64 and 32 (its 1280-wide level is 32x32).
_SIDES = (64, 32, 16, 8, 96, 48, 24, 12)
# The transformer widths of SD 1.x / 2.x / SDXL, a power of two (no column mask: 1024), a width that is
# not a multiple of 16 (unaligned rows, 1000 is not: 1000 % 16 = 8) and the widest row.
_WIDTHS = (320, 640, 1280, 1024, 1000, MAX_WIDTH)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _aot_entry(n_rows: int, width: int, dtype: torch.dtype, fused: bool, affine: bool) -> aot.AotConfig:
    """Specialised as triton's JIT specialises a UNet call: 16-byte-aligned pointers, widths and row
    strides with ':16' where divisible; the row count of unknown divisibility."""
    cfg = choose_config(n_rows, width)
    args = dict(
        X=dtype,
        U=dtype,
        S=dtype,
        Y=dtype,
        W=dtype,
        B=dtype,
        n_rows=n_rows,
        N=n_rows,
        C=width,
        eps=1e-5,
        **{f"stride_{t}{axis}": step for t in "xusy" for axis, step in (("b", n_rows * width), ("n", width), ("c", 1))},
    )
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, HAS_UPDATE=fused, HAS_WEIGHT=affine, HAS_BIAS=affine)
    return aot.config(_layer_norm_kernel, args, constexprs, cfg.num_warps, 3, ("n_rows", "N"))


def aot_configs() -> list[aot.AotConfig]:
    """Every configuration the launcher compiles for the real token shapes, plain and fused, in every
    dtype, plus the no-affine variant; duplicates removed."""
    configs = []
    for dtype in _DTYPES.values():
        for width in _WIDTHS:
            for n_rows in sorted({batch * side * side for batch in (1, 2) for side in _SIDES}):
                for fused in (False, True):
                    configs.append(_aot_entry(n_rows, width, dtype, fused, True))
    configs.append(_aot_entry(2 * 64 * 64, 320, torch.float16, True, False))
    return aot.unique(configs)
