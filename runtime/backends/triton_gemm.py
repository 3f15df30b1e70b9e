"""The feed-forward's and Transformer2D's GEMMs with their epilogues fused (kernels/fused_linear.py).

- GEGLU projection: x @ W^T + b and a * gelu(g) as one kernel (TritonGEGLU, triton_layers.py, calls
  `geglu_projection`): the [tokens, 8C] projection never reaches memory.
- ff output + the block's final residual: `ff_with_residual` (TritonTransformerBlock calls it) runs the
  ff's output linear with the residual stream added in its epilogue.
- Transformer2D proj_out + its input: TritonTransformer2D adds the block input in proj_out's epilogue,
  whether proj_out is a Linear (SD 2.x, SDXL) or a 1x1 conv (SD 1.x: over channels_last memory the NHWC
  tokens are the conv's input already, as runtime/backends/pointwise_conv.py explains).

Each falls back to the module path as it is where the kernel does not take the input: another dtype,
CPU tensors outside the interpreter, a layer carrying hooks (a probe must see it run), a layer that is not
a plain Linear / 1x1 conv, an NCHW input to proj_out.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kernels import fused_linear
from runtime.backends.pointwise_conv import PointwiseConv2d, has_pointwise_geometry
from runtime.models.blocks import FeedForward, Transformer2DModel
from runtime.models.substitution import rebind, replace_modules


def _unhooked(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _device_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _params_ok(x: torch.Tensor, layer: nn.Module) -> bool:
    return all(
        p is None or (p.dtype == x.dtype and p.device == x.device) for p in (layer.weight, getattr(layer, "bias", None))
    )


def linear_takes(x: torch.Tensor, layer: nn.Module) -> bool:
    """Whether the fused kernels can run `layer` (a plain nn.Linear) on x [..., in_features]."""
    return (
        type(layer) is nn.Linear
        and _unhooked(layer)
        and x.dtype in fused_linear.SUPPORTED_DTYPES
        and x.shape[-1] == layer.in_features
        and _device_ok(x)
        and _params_ok(x, layer)
    )


def geglu_projection(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor | None:
    """a * gelu(g) of proj(x) as one kernel, or None where the kernel does not take it."""
    if not linear_takes(x, proj):
        return None
    return fused_linear.linear_geglu(x, proj.weight, proj.bias)


def ff_with_residual(ff: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + ff(x), with the ff's output linear and the add as one kernel where it takes them."""
    if type(ff) is not FeedForward or not _unhooked(ff) or not all(_unhooked(m) for m in ff.net[:2]):
        return residual + ff(x)
    h = ff.net[1](ff.net[0](x))  # GEGLU, then diffusers' Dropout slot (an Identity)
    out = ff.net[2]
    if not linear_takes(h, out) or residual.shape != (*h.shape[:-1], out.out_features) or residual.dtype != h.dtype:
        return residual + out(h)
    return fused_linear.linear_bias_residual(h, out.weight, out.bias, residual)


def _proj_out_weight(proj: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """proj_out's [C, C] weight when the fused kernel takes it with x [B, C, H, W] as the residual."""
    if not _unhooked(proj) or x.dim() != 4 or not x.permute(0, 2, 3, 1).is_contiguous():  # channels_last only
        return None
    if x.dtype not in fused_linear.SUPPORTED_DTYPES or not _device_ok(x) or not _params_ok(x, proj):
        return None
    if type(proj) is nn.Linear:
        return proj.weight
    if type(proj) in (nn.Conv2d, PointwiseConv2d) and has_pointwise_geometry(proj):
        return proj.weight[:, :, 0, 0]  # a [C_out, C_in] view whatever the weight's memory format
    return None


class TritonTransformer2D(Transformer2DModel):
    """Transformer2DModel with proj_out and the residual add as one GEMM over the NHWC tokens; same state dict."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        weight = _proj_out_weight(self.proj_out, x)
        if weight is None:
            return super().forward(x, context)
        batch, channels, height, width = x.shape
        h = self.tokens(x, context)  # [B, H*W, C]
        residual = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view of channels_last x
        out = fused_linear.linear_bias_residual(h, weight, self.proj_out.bias, residual)
        # [B, H, W, C] memory permuted back: the channels_last tensor the reference returns.
        return out.view(batch, height, width, channels).permute(0, 3, 1, 2)


def fuse_output_gemms(model: nn.Module):
    """Substitute every Transformer2DModel of `model` (exact type) by TritonTransformer2D."""
    return replace_modules(model, lambda m: type(m) is Transformer2DModel, lambda old: rebind(old, TritonTransformer2D))
