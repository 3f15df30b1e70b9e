"""GEMMs with the feed-forward's epilogues: x @ W^T + b followed by GEGLU, or by a residual add, one pass.

The transformer block's feed-forward projects C channels to 8C, splits the result in two halves and
multiplies the first by the GELU of the second (diffusers' GEGLU); its output linear is then added to the
residual stream, and Transformer2D's proj_out adds the block input back. Run as cuBLAS + a separate
kernel, the [tokens, 8C] projection is written and read back once more, and each output linear's result
makes one more round trip for the add. Here:

- `linear_geglu(x, weight, bias)` = a * gelu(g) with [a, g] = x @ weight.T + bias split in halves along
  the last dim (first half the value, second half the gate; exact erf GELU, as kernels/geglu.py). Each
  program accumulates the output-column tile of both halves (weight rows n and inner + n) and writes only
  the [tokens, inner] result.
- `linear_bias_residual(x, weight, bias, residual)` = x @ weight.T + bias + residual.

Layout. x is [..., K] with a unit last stride and leading dims that flatten to rows (else it is copied
first); weight is [N, K] as nn.Linear holds it (a 1x1 conv's weight[:, :, 0, 0] view too), read in place
through its strides: no copy, no transpose, so LoRA's in-place edits and CUDA graphs' parameter addresses
both stay valid. residual is [..., N] like the output, unit last stride. The result is a new contiguous
[..., N] tensor of x's dtype. Rows, columns and K are masked where ragged (EVEN_K skips the K mask).

Numerics. fp16, bf16 and fp32 (every tensor one dtype); fp32 accumulation, epilogue in fp32, one rounding
on store. fp32 inputs multiply in IEEE fp32 (no TF32), as torch's default matmul does.

Both are torch custom ops (`sd_kernels::linear_geglu`, `sd_kernels::linear_bias_residual`) with fake
implementations, so CUDA graphs capture them and meta tensors trace through them (kernels/attention.py).
They run on CPU tensors under TRITON_INTERPRET=1.
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
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # GELU(g) = g * (1 + erf(g / sqrt 2)) / 2
# Below this many rows a 128-row tile leaves most of the H100's 132 SMs idle (SD's deepest level at
# batch 2 has 128 tokens), so small-M shapes take 64-row tiles.
LARGE_M = 1024


@triton.jit
def _matmul_tile(X, W, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_wk, BLOCK_K, EVEN_K, IEEE):
    """acc[BLOCK_M, BLOCK_N] = x[offs_m, :] @ W[offs_n, :]^T in fp32. Rows and columns beyond M / N wrap
    round to valid ones (their results are not stored), so only a ragged K needs a mask in the loop and
    the loads pipeline (triton's matmul tutorial does the same)."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # rows * K passes 2**31 at large SDXL batches
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + (offs_n % N)[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE:  # fp32 products (a no-op cast for fp32 inputs)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _linear_geglu_kernel(
    X,  # [M, K] input, unit column stride
    W,  # [2 * N, K] weight (nn.Linear layout), any strides
    B,  # [2 * N] bias (contiguous; unread without HAS_BIAS)
    Y,  # [M, N] output, unit column stride
    M,
    N,  # inner width: the gate half's weight rows start N rows in
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask in the loop
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 products in IEEE precision, not TF32 (see _ieee)
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows / columns wrap round as in _matmul_tile; one x tile feeds both products, against
    # the value's weight rows n and the gate's rows N + n.
    x_ptrs = X + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    wa_ptrs = W + (offs_n % N)[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    wg_ptrs = wa_ptrs + N * stride_wn
    a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wa = tl.load(wa_ptrs)
            wg = tl.load(wg_ptrs)
        else:
            k_left = K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wa = tl.load(wa_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            wg = tl.load(wg_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE:
            xt = xt.to(tl.float32)
            a = tl.dot(xt, wa.to(tl.float32), a, input_precision="ieee")
            g = tl.dot(xt, wg.to(tl.float32), g, input_precision="ieee")
        else:
            a = tl.dot(xt, wa, a)
            g = tl.dot(xt, wg, g)
        x_ptrs += BLOCK_K
        wa_ptrs += BLOCK_K * stride_wk
        wg_ptrs += BLOCK_K * stride_wk
    n_ok = offs_n < N
    if HAS_BIAS:
        a += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        g += tl.load(B + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = a * (0.5 * g * (1.0 + tl.math.erf(g * _SQRT_HALF)))
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _linear_bias_residual_kernel(
    X,  # [M, K] input, unit column stride
    W,  # [N, K] weight (nn.Linear layout), any strides
    B,  # [N] bias (contiguous; unread without HAS_BIAS)
    R,  # [M, N] residual, unit column stride
    Y,  # [M, N] output, unit column stride
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _matmul_tile(X, W, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_wk, BLOCK_K, EVEN_K, IEEE)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    acc += tl.load(R + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def choose_config(m: int, dtype: torch.dtype, geglu: bool) -> GemmConfig:
    """Hopper tiles: 128x128x64 at 8 warps, 3 stages for large M (the GEGLU kernel's two accumulators
    halve its column tile to keep 64 fp32 accumulator registers per thread); 64-row tiles at 4 warps for
    small M. fp32 (IEEE products, no tensor cores) takes small tiles."""
    if dtype == torch.float32:  # IEEE fp32 runs on the FMA units: a 32x32 tile keeps it in registers
        return GemmConfig(32, 32, 32, 4, 2)
    stages = 3
    block_n = 64 if geglu else 128
    if m >= LARGE_M:
        return GemmConfig(128, block_n, 64, 8, stages)
    return GemmConfig(64, 64, 64, 4, stages)


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in IEEE fp32. So do bf16 ones under the interpreter, whose tl.dot misreads bf16
    operands (triton 3.8: results off by 1e20); on a GPU bf16 goes to the tensor cores as it is."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _check_common(name: str, x, weight, bias, extra: dict) -> None:
    tensors = {"x": x, "weight": weight, **({"bias": bias} if bias is not None else {}), **extra}
    for label, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {label} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {label} has dtype {t.dtype} but x has {x.dtype}; one dtype needed")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device} but x on {x.device}; one device needed")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name}: x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{name}: weight must be [N, K] with K = x's last dim {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be [{weight.shape[0]}] (one per weight row), got {tuple(bias.shape)}")
    if x.device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{name}: x is on {x.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width] with unit column stride, a view where the strides allow it."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims that do not flatten
        return t.contiguous().view(-1, t.shape[-1])


def _grid(m: int, n: int, cfg: GemmConfig) -> tuple[int, int]:
    return triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)


def launch_geglu(x, weight, bias, out, config: GemmConfig | None = None) -> None:
    """x [M, K] (unit column stride), weight [2N, K], bias [2N] or None, into out [M, N] (unit column stride)."""
    m, n = out.shape
    k = x.shape[1]
    if x.shape[0] != m or weight.shape != (2 * n, k) or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(
            f"fused_linear.launch_geglu: x must be [{m}, K], weight [{2 * n}, K] and out [{m}, {n}] with unit "
            f"column strides; got x {tuple(x.shape)} {x.stride()}, weight {tuple(weight.shape)}, out {out.stride()}"
        )
    if m == 0:
        return
    cfg = config or choose_config(m, x.dtype, geglu=True)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _linear_geglu_kernel[_grid(m, n, cfg)](
            x,
            weight,
            bias if bias is not None else weight,
            out,
            m,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            weight.stride(1),
            out.stride(0),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            EVEN_K=k % cfg.block_k == 0,
            HAS_BIAS=bias is not None,
            IEEE=_ieee(x.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


def launch_bias_residual(x, weight, bias, residual, out, config: GemmConfig | None = None) -> None:
    """x [M, K], weight [N, K], bias [N] or None, residual [M, N], into out [M, N] (unit column strides)."""
    m, n = out.shape
    k = x.shape[1]
    if (
        x.shape[0] != m
        or weight.shape != (n, k)
        or residual.shape != (m, n)
        or x.stride(1) != 1
        or residual.stride(1) != 1
        or out.stride(1) != 1
    ):
        raise ValueError(
            f"fused_linear.launch_bias_residual: x must be [{m}, K], weight [{n}, K], residual and out "
            f"[{m}, {n}] with unit column strides; got x {tuple(x.shape)} {x.stride()}, weight "
            f"{tuple(weight.shape)}, residual {tuple(residual.shape)} {residual.stride()}, out {out.stride()}"
        )
    if m == 0:
        return
    cfg = config or choose_config(m, x.dtype, geglu=False)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _linear_bias_residual_kernel[_grid(m, n, cfg)](
            x,
            weight,
            bias if bias is not None else weight,
            residual,
            out,
            m,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            weight.stride(1),
            residual.stride(0),
            out.stride(0),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            EVEN_K=k % cfg.block_k == 0,
            HAS_BIAS=bias is not None,
            IEEE=_ieee(x.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


def _geglu_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], weight.shape[0] // 2), dtype=x.dtype, device=x.device)


def _linear_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("sd_kernels::linear_geglu", mutates_args=())
def _linear_geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _geglu_output(x, weight)
    launch_geglu(_rows(x), weight, bias.contiguous() if bias is not None else None, out.view(-1, out.shape[-1]))
    return out


@_linear_geglu_op.register_fake
def _linear_geglu_fake(x, weight, bias):
    return _geglu_output(x, weight)


@torch.library.custom_op("sd_kernels::linear_bias_residual", mutates_args=())
def _linear_bias_residual_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    out = _linear_output(x, weight)
    launch_bias_residual(
        _rows(x),
        weight,
        bias.contiguous() if bias is not None else None,
        _rows(residual),
        out.view(-1, out.shape[-1]),
    )
    return out


@_linear_bias_residual_op.register_fake
def _linear_bias_residual_fake(x, weight, bias, residual):
    return _linear_output(x, weight)


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K], weight [2N, K], bias [2N] or None -> a * gelu(g) with [a, g] = (x @ weight.T + bias)
    split in halves (exact erf GELU): a new contiguous [..., N] tensor."""
    _check_common("linear_geglu", x, weight, bias, {})
    if weight.shape[0] % 2:
        raise ValueError(f"linear_geglu: weight must have an even row count (two halves), got {tuple(weight.shape)}")
    return torch.ops.sd_kernels.linear_geglu(x, weight, bias)


def linear_bias_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """x [..., K] @ weight.T [K, N] + bias [N] + residual [..., N]: a new contiguous [..., N] tensor."""
    _check_common("linear_bias_residual", x, weight, bias, {"residual": residual})
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(residual.shape) != expected:
        raise ValueError(
            f"linear_bias_residual: residual must be {expected} (x's rows, N), got {tuple(residual.shape)}"
        )
    return torch.ops.sd_kernels.linear_bias_residual(x, weight, bias, residual)


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype


def linear_geglu_reference(x, weight, bias, upcast: bool = True) -> torch.Tensor:
    """Plain torch, as runtime.models.blocks.GEGLU: with upcast=True in fp32 (fp64 stays fp64), cast back."""
    c = _compute_dtype(x, upcast)
    h = F.linear(x.to(c), weight.to(c), bias.to(c) if bias is not None else None)
    a, g = h.chunk(2, dim=-1)
    return (a * F.gelu(g)).to(x.dtype)


def linear_bias_residual_reference(x, weight, bias, residual, upcast: bool = True) -> torch.Tensor:
    """Plain torch: F.linear then the residual add; with upcast=True in fp32 (fp64 stays fp64), cast back."""
    c = _compute_dtype(x, upcast)
    h = F.linear(x.to(c), weight.to(c), bias.to(c) if bias is not None else None)
    return (h + residual.to(c)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation list (tests/kernels/test_sass.py compiles each entry for sm_90).

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _aot_entry(geglu: bool, dtype: str, m: int, k: int) -> aot.AotConfig:
    """Specialised as triton's JIT specialises a UNet call: 16-byte-aligned pointers, SD widths and strides
    divisible by 16, the row count of unknown divisibility (a count argument)."""
    cfg = choose_config(m, _DTYPES[dtype], geglu)
    n = 1280
    fn = _linear_geglu_kernel if geglu else _linear_bias_residual_kernel
    args = {"X": _DTYPES[dtype], "W": _DTYPES[dtype], "B": _DTYPES[dtype], "Y": _DTYPES[dtype], "R": _DTYPES[dtype]}
    args.update(M=m, N=n, K=k, stride_xm=k, stride_wn=k, stride_wk=1, stride_ym=n, stride_rm=n)
    constexprs = {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "EVEN_K": k % cfg.block_k == 0,
        "HAS_BIAS": True,
        "IEEE": dtype == "fp32",
    }
    args = {name: args[name] for name in fn.arg_names if name not in constexprs}
    return aot.config(fn, args, constexprs, cfg.num_warps, cfg.num_stages, count_args=("M",))


# Large- and small-M tiles for each dtype and kernel at SD widths (every SD K is a multiple of 64, so K =
# 1280 stands for all); one ragged K (1000) per kernel in fp16 for the masked loop.
def aot_configs() -> list[aot.AotConfig]:
    entries = [
        _aot_entry(geglu, dtype, m, 1280)
        for geglu in (True, False)
        for dtype in ("fp16", "bf16", "fp32")
        for m in (LARGE_M * 8, 128)
    ]
    entries += [_aot_entry(geglu, "fp16", LARGE_M * 8, 1000) for geglu in (True, False)]
    return aot.unique(entries)
