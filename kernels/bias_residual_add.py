"""Resnet output: out = (shortcut + h + bias[c]) / output_scale_factor, one pass.

A resnet ends with conv2 -> bias add -> + shortcut (-> / output_scale_factor). cuDNN's convolution takes
no bias, so in torch that is a bias-add kernel (read h, write h) and the residual add (read both, write
out), plus a division in the mid block: two or three passes. The triton backend runs conv2 without its
bias and this kernel reads the shortcut and h once, adds the per-channel bias and scales, and writes out
once: one launch, 3 tensor passes instead of 5 (or 7).

Layout. shortcut and h must have the same shape [B, C, H, W] and the same strides, dense either as
contiguous NCHW or as channels_last (NHWC memory): the kernel walks the memory flat, and the channel of
an element is offset % C (channels_last) or (offset // (H*W)) % C (NCHW). The output is a new tensor with
the same strides (torch.empty_like). Other layouts are refused with a clear error; the caller falls back.

Numerics. fp16, bf16 and fp32 (bias of any of them); the sum and the division are done in fp32 and
rounded once on store (torch rounds after each op).

`bias_residual_add` is the torch custom op `sd_kernels::bias_residual_add` (torch.library.custom_op with a
fake implementation, so CUDA graphs capture it and fake / meta tensors trace through it), as
kernels/attention.py explains. It runs on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from kernels import aot

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program: 8 per thread at 4 warps, a 16-byte vector of fp16 per tensor per thread.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _bias_residual_add_kernel(
    X,  # pointer to the shortcut's first element (dense, same strides as H)
    H,  # pointer to the conv output's first element
    BIAS,  # pointer to the [C] bias (contiguous)
    OUT,  # pointer to the output's first element (same strides as X)
    n_elements,  # B * C * H * W
    C,  # channels
    HW,  # H * W (only read for NCHW memory)
    scale,  # output_scale_factor: the sum is divided by it
    BLOCK: tl.constexpr,  # elements per program
    CHANNELS_LAST: tl.constexpr,  # memory is NHWC: the channel is the fastest index
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # large VAE batches pass 2**31
    mask = offs < n_elements
    if CHANNELS_LAST:
        channel = offs % C
    else:
        channel = (offs // HW) % C
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(BIAS + channel, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, ((x + h + b) / scale).to(OUT.dtype.element_ty), mask=mask)


def dense_layout(t: torch.Tensor) -> bool | None:
    """True for channels_last memory, False for contiguous NCHW, None for anything else. (A tensor that
    is both, such as H = W = 1, reads as NCHW: then both formulas give the same channel.)"""
    if t.dim() != 4:
        return None
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


def supports(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs as they are (so a caller can fall back before launching)."""
    return (
        x.dtype in SUPPORTED_DTYPES
        and h.dtype == x.dtype
        and bias.dtype in SUPPORTED_DTYPES
        and x.shape == h.shape
        and x.stride() == h.stride()
        and dense_layout(x) is not None
        and bias.shape == (x.shape[1],)
        and bias.is_contiguous()
        and x.device == h.device == bias.device
    )


def _check_inputs(x, h, bias, output_scale_factor) -> None:
    for name, t in (("shortcut", x), ("h", h), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bias_residual_add: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"bias_residual_add: {name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
    if x.dim() != 4 or x.shape != h.shape or x.dtype != h.dtype:
        raise ValueError(
            f"bias_residual_add: shortcut and h must be [B, C, H, W] of one shape and dtype, got "
            f"{tuple(x.shape)} {x.dtype} and {tuple(h.shape)} {h.dtype}"
        )
    if x.stride() != h.stride() or dense_layout(x) is None:
        raise ValueError(
            f"bias_residual_add: shortcut and h must share dense NCHW or channels_last strides, got "
            f"{x.stride()} and {h.stride()}"
        )
    if bias.shape != (x.shape[1],) or not bias.is_contiguous():
        raise ValueError(f"bias_residual_add: bias must be a contiguous [{x.shape[1]}], got {tuple(bias.shape)}")
    if not x.device == h.device == bias.device:
        raise ValueError(f"bias_residual_add: inputs on {x.device}, {h.device}, {bias.device}; one device needed")
    if not isinstance(output_scale_factor, (int, float)) or not output_scale_factor > 0:
        raise ValueError(
            f"bias_residual_add: output_scale_factor must be a positive number, got {output_scale_factor!r}"
        )
    if x.device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"bias_residual_add: inputs are on {x.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )


def launch(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, output_scale_factor: float, out: torch.Tensor) -> None:
    """Run the kernel into `out`, which must have x's shape, dtype and strides."""
    if out.shape != x.shape or out.stride() != x.stride() or out.dtype != x.dtype:
        raise ValueError(
            f"bias_residual_add.launch: out must match the shortcut's shape {tuple(x.shape)}, strides "
            f"{x.stride()} and dtype {x.dtype}; got {tuple(out.shape)}, {out.stride()}, {out.dtype}"
        )
    n = x.numel()
    if n == 0:
        return
    batch, channels, height, width = x.shape
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _bias_residual_add_kernel[(triton.cdiv(n, BLOCK),)](
            x,
            h,
            bias,
            out,
            n,
            channels,
            height * width,
            float(output_scale_factor),
            BLOCK=BLOCK,
            CHANNELS_LAST=bool(dense_layout(x)),
            num_warps=NUM_WARPS,
        )


@torch.library.custom_op("sd_kernels::bias_residual_add", mutates_args=())
def _bias_residual_add_op(
    x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, output_scale_factor: float
) -> torch.Tensor:
    out = torch.empty_like(x)
    launch(x, h, bias, output_scale_factor, out)
    return out


@_bias_residual_add_op.register_fake
def _bias_residual_add_fake(x, h, bias, output_scale_factor):
    return torch.empty_like(x)


def bias_residual_add(
    x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, output_scale_factor: float = 1.0
) -> torch.Tensor:
    """(x + h + bias[None, :, None, None]) / output_scale_factor: x and h [B, C, H, W] with the same dense
    strides (NCHW or channels_last), bias [C]; a new tensor with x's strides and dtype."""
    _check_inputs(x, h, bias, output_scale_factor)
    return torch.ops.sd_kernels.bias_residual_add(x, h, bias, float(output_scale_factor))


def bias_residual_add_reference(
    x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, output_scale_factor: float = 1.0, upcast: bool = True
) -> torch.Tensor:
    """Plain torch, as ResnetBlock2D computes it: with upcast=True in fp32 (fp64 stays fp64), cast back."""
    compute = (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype
    h = h.to(compute) + bias.to(compute)[None, :, None, None]
    out = x.to(compute) + h
    if output_scale_factor != 1.0:
        out = out / output_scale_factor
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation list (tests/kernels/test_sass.py compiles each entry for sm_90).


def _aot_entry(dtype: str, channels_last: bool) -> aot.AotConfig:
    """Specialised as triton's JIT specialises a UNet call: 16-byte-aligned pointers, the channel count and
    H*W divisible by 16 (every SD resnet's is; the element count too), the scale a runtime float."""
    signature = {
        "X": f"*{dtype}:16",
        "H": f"*{dtype}:16",
        "BIAS": f"*{dtype}:16",
        "OUT": f"*{dtype}:16",
        "n_elements": "i32:16",
        "C": "i32:16",
        "HW": "i32:16",
        "scale": "fp32",
        "BLOCK": "constexpr",
        "CHANNELS_LAST": "constexpr",
    }
    constexprs = {"BLOCK": BLOCK, "CHANNELS_LAST": channels_last}
    return aot.AotConfig(_bias_residual_add_kernel, signature, constexprs, NUM_WARPS, 3)


# Both layouts (the triton backend runs channels_last; NCHW where it is turned off), every dtype.
def aot_configs() -> list[aot.AotConfig]:
    return [_aot_entry(dtype, cl) for dtype in ("fp16", "bf16", "fp32") for cl in (True, False)]
