"""The two layers a backend may swap for kernels: GroupNorm(+activation) and the attention core.

Model code builds these and nothing else for normalisation and attention, so a backend can
substitute kernel-backed modules at load time (see runtime/models/substitution.py) without the
models knowing. Both keep the parameter names of their torch / diffusers counterparts, so the
state-dict keys stay identical to diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = (None, "silu")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with an optional activation fused after it.

    Diffusers applies GroupNorm and SiLU as two modules; here they are one so that a kernel can do
    both in a single pass over memory. Parameters are `weight` and `bias`, as in nn.GroupNorm.

    `shift` ([B, C] or [1, C], x's dtype) is added to x per channel before the statistics: a resnet's
    conv bias plus its time embedding, which a kernel reads here instead of a separate add over the
    whole tensor. This reference adds it in x's dtype, then normalises.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, activation: str | None = None
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNorm activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.activation = activation

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        if shift is not None:
            x = x + shift[:, :, None, None]
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(x) if self.activation == "silu" else x

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class AttentionCore(nn.Module):
    """softmax(q @ k^T * scale) @ v, not causal, no mask.

    q: [B, H, Nq, D], k and v: [B, H, Nk, D] -> [B, H, Nq, D] in q's dtype. Inputs may be strided
    views (the head split of a projection's output); implementations must not require contiguity.
    `upcast` (SD 2.1's upcast_attention) asks for the scores and softmax in fp32 whatever the input
    dtype: this reference computes the whole core in fp32; a kernel that accumulates in fp32 already
    honours it natively. Holds no parameters.
    """

    def __init__(self, upcast: bool = False):
        super().__init__()
        self.upcast = upcast

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.upcast and q.dtype != torch.float32:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)

    def extra_repr(self) -> str:
        return f"upcast={self.upcast}"
