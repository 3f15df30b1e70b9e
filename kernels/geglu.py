"""GEGLU: y = a * gelu(g) where [a, g] are the two halves of the last dim of x (exact erf GELU).

The UNet's feed-forward projects C channels to 8C and multiplies the first half by the GELU of the
second. In torch that is three passes over memory: `chunk` (a view), `gelu(g)` (read 4C, write 4C) and
the product (read 4C + 4C, write 4C), 20C elements moved per token and two launches. This kernel reads
the 8C projection once and writes the 4C result: 12C elements, one launch.

Layout. x is [..., 2C]: its last dim must have stride 1 and its leading dims must flatten to rows (the
output of nn.Linear always does); other inputs are made contiguous first. The result is a new
contiguous [..., C] tensor of x's dtype. Each program owns a tile of BLOCK_M rows x BLOCK_N columns of
the output and loads the matching tiles of both halves; rows are masked, columns only when C is not a
multiple of BLOCK_N (EVEN_N).

Numerics. fp16, bf16 and fp32; the product and the GELU are computed in fp32 and rounded once on store
(torch rounds twice, after the GELU and after the product).

`geglu` is the torch custom op `sd_kernels::geglu` (torch.library.custom_op with a fake implementation,
so CUDA graphs capture it and fake / meta tensors trace through it), as kernels/attention.py explains.
It runs on CPU tensors under TRITON_INTERPRET=1.
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
# Output elements per program: 4096 = 32 per thread of each half at 4 warps, 8 KiB of fp16 per half in
# flight per program (as kernels/group_norm.py's MAX_TILE); enough to cover HBM latency without spills.
TILE_ELEMENTS = 4096
# Widest column block: 256 divides every SD width (C = 1280, 2560, 5120), so no lane is masked there.
MAX_BLOCK_N = 256
NUM_WARPS = 4
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), GELU(g) = g * (1 + erf(g / sqrt 2)) / 2


@triton.jit
def _geglu_kernel(
    X,  # pointer to x[0, 0] of the [rows, 2C] input (last dim contiguous)
    Y,  # pointer to y[0, 0] of the [rows, C] output (last dim contiguous)
    n_rows,  # rows (product of the leading dims)
    C,  # output width; the gate half starts C elements into each input row
    stride_xm,  # elements between input rows (2C when contiguous)
    stride_ym,  # elements between output rows (C when contiguous)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # output columns per program (a power of two)
    EVEN_N: tl.constexpr,  # C % BLOCK_N == 0: no column mask
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        mask = (offs_m < n_rows)[:, None]
    else:
        mask = (offs_m < n_rows)[:, None] & (offs_n < C)[None, :]
    rows = offs_m.to(tl.int64)  # rows * 2C passes 2**31 at large batches of SDXL tokens
    x_ptrs = X + rows[:, None] * stride_xm + offs_n[None, :]
    a = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptrs + C, mask=mask, other=0.0).to(tl.float32)
    y = a * (0.5 * g * (1.0 + tl.math.erf(g * _SQRT_HALF)))
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GEGLUConfig:
    block_m: int
    block_n: int
    num_warps: int


def choose_config(width: int) -> GEGLUConfig:
    """Column block: the widest power of two up to MAX_BLOCK_N that the width needs; rows fill the tile."""
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(width))
    return GEGLUConfig(block_m=TILE_ELEMENTS // block_n, block_n=block_n, num_warps=NUM_WARPS)


def _check_inputs(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"geglu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"geglu: x has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dim of x must be even and non-zero (two halves), got shape {tuple(x.shape)}")
    if x.device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"geglu: x is on {x.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, 2C] with unit column stride, a view where the strides allow it."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dims that do not flatten
        return x.contiguous().view(-1, x.shape[-1])


def launch(x: torch.Tensor, out: torch.Tensor, config: GEGLUConfig | None = None) -> None:
    """Run the kernel: x [rows, 2C] with unit column stride into out [rows, C] with unit column stride."""
    n_rows, width = out.shape
    if n_rows == 0:
        return
    if x.shape != (n_rows, 2 * width) or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(
            f"geglu.launch: x must be [{n_rows}, {2 * width}] and both column strides 1, got x "
            f"{tuple(x.shape)} strides {x.stride()}, out strides {out.stride()}"
        )
    cfg = config or choose_config(width)
    grid = (triton.cdiv(n_rows, cfg.block_m), triton.cdiv(width, cfg.block_n))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _geglu_kernel[grid](
            x,
            out,
            n_rows,
            width,
            x.stride(0),
            out.stride(0),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            EVEN_N=width % cfg.block_n == 0,
            num_warps=cfg.num_warps,
        )


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)


@torch.library.custom_op("sd_kernels::geglu", mutates_args=())
def _geglu_op(x: torch.Tensor) -> torch.Tensor:
    out = _empty_output(x)
    launch(_rows(x), out.view(-1, out.shape[-1]))
    return out


@_geglu_op.register_fake
def _geglu_fake(x):
    return _empty_output(x)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2C] -> x[..., :C] * gelu(x[..., C:]) (exact erf GELU), a new contiguous [..., C] tensor."""
    _check_inputs(x)
    return torch.ops.sd_kernels.geglu(x)


def geglu_reference(x: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Plain torch; with upcast=True the math is fp32 (fp64 stays fp64) and the result is cast back."""
    compute = (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype
    a, g = x.to(compute).chunk(2, dim=-1)
    return (a * F.gelu(g)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation list (tests/kernels/test_sass.py compiles each entry for sm_90).


def _aot_entry(width: int, dtype: str) -> aot.AotConfig:
    """Specialised as triton's JIT specialises a UNet call: 16-byte-aligned pointers, widths and row
    strides divisible by 16 (every SD width is), the row count of unknown divisibility."""
    cfg = choose_config(width)
    hint = ":16" if width % 16 == 0 else ""
    signature = {
        "X": f"*{dtype}:16",
        "Y": f"*{dtype}:16",
        "n_rows": "i32",
        "C": f"i32{hint}",
        "stride_xm": "i32:16" if (2 * width) % 16 == 0 else "i32",
        "stride_ym": f"i32{hint}",
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "EVEN_N": "constexpr",
    }
    constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "EVEN_N": width % cfg.block_n == 0}
    return aot.AotConfig(_geglu_kernel, signature, constexprs, cfg.num_warps, 3)


# The SD feed-forward widths 1280 / 2560 / 5120 (4 x 320 / 640 / 1280; SD 1.x, 2.x and SDXL share them)
# specialise identically, so 1280 stands for all three; 1000 is not a multiple of the column block (the
# masked variant). Every supported dtype.
def aot_configs() -> list[aot.AotConfig]:
    return [_aot_entry(width, dtype) for dtype in ("fp16", "bf16", "fp32") for width in (1280, 1000)]
