"""The transformer block with its LayerNorms and residual adds fused: the triton backend's substitution.

BasicTransformerBlock runs three LayerNorms and three residual adds; the second and third norms read
the residual stream right after an add. Here the first norm is kernels.layer_norm and each later
add + norm pair is one kernels.add_layer_norm launch, which writes both the new residual stream and its
normalised copy:

    n1 = LN1(x);  x, n2 = add_LN2(x, attn1(n1));  x, n3 = add_LN3(x, attn2(n2, context));  x + ff(n3)

Two launches and one pass over the tokens fewer per fused pair (32 launches per SD 1.5 step). The last
add rides in the ff's output GEMM (runtime/backends/triton_gemm.py); the attention modules are untouched.
Inputs the kernel does not take (fp64, rows wider than its maximum, CPU tensors outside the interpreter)
and norms carrying hooks run the torch block as it is.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kernels import layer_norm
from runtime.backends.triton_gemm import ff_with_residual
from runtime.models.blocks import BasicTransformerBlock
from runtime.models.substitution import rebind, replace_modules


def _kernel_takes(x: torch.Tensor, norms: tuple[nn.LayerNorm, ...]) -> bool:
    if x.dtype not in layer_norm.SUPPORTED_DTYPES or x.shape[-1] > layer_norm.MAX_WIDTH:
        return False
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    for norm in norms:
        if type(norm) is not nn.LayerNorm or norm.normalized_shape != (x.shape[-1],):
            return False
        if norm._forward_hooks or norm._forward_pre_hooks:  # a probe on a norm must see it run
            return False
        if any(p is not None and p.dtype not in layer_norm.SUPPORTED_DTYPES for p in (norm.weight, norm.bias)):
            return False
    return True


def _params(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


class TritonTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock with LN1 as one kernel and each residual add + next LN as one; same state dict."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not _kernel_takes(x, (self.norm1, self.norm2, self.norm3)):
            return super().forward(x, context)
        n1 = layer_norm.layer_norm(x, *_params(self.norm1))
        x, n2 = layer_norm.add_layer_norm(
            x, self.attn1(n1, context if self.only_cross_attention else None), *_params(self.norm2)
        )
        x, n3 = layer_norm.add_layer_norm(x, self.attn2(n2, context), *_params(self.norm3))
        return ff_with_residual(self.ff, n3, x)  # the ff's output GEMM adds x in its epilogue


def fuse_layer_norms(model: nn.Module):
    """Substitute every BasicTransformerBlock of `model` (exact type) by TritonTransformerBlock."""
    return replace_modules(
        model, lambda m: type(m) is BasicTransformerBlock, lambda old: rebind(old, TritonTransformerBlock)
    )
