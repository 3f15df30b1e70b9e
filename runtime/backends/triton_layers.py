"""Kernel-backed versions of runtime.models.layers, used by the `triton` backend."""

from __future__ import annotations

import torch

from kernels import attention, geglu, group_norm  # the kernel modules
from runtime.backends.triton_gemm import geglu_projection
from runtime.models.blocks import GEGLU
from runtime.models.layers import AttentionCore, GroupNorm

# The attention kernel handles head dims up to this; the VAE's single 512-wide head falls back to SDPA.
MAX_KERNEL_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
GEGLU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonGroupNorm(GroupNorm):
    """GroupNorm(+SiLU) computed by kernels.group_norm; same parameters, same state-dict keys."""

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        # The kernel reads `shift` itself (added in fp32 before the statistics): no separate add over x.
        return group_norm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation, shift=shift)


class TritonAttentionCore(AttentionCore):
    """Attention computed by kernels.attention where the kernel supports the shape and dtype.

    `upcast` needs nothing extra here: the kernel keeps scores, softmax and accumulators in fp32.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[-1] <= MAX_KERNEL_HEAD_DIM and q.dtype in KERNEL_DTYPES:
            return attention.attention(q, k, v)
        return super().forward(q, k, v)


class TritonGEGLU(GEGLU):
    """The feed-forward's projection with GEGLU in its epilogue (kernels.fused_linear); where that kernel does
    not take the input, the projection then kernels.geglu (one pass over the 8C projection, not three)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = geglu_projection(x, self.proj)  # projection and GEGLU in one GEMM where the kernel takes it
        if fused is not None:
            return fused
        h = self.proj(x)
        return geglu.geglu(h) if h.dtype in GEGLU_DTYPES else super().forward(x)
