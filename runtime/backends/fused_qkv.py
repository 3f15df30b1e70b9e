"""Self-attention's q, k and v projections as one GEMM: the triton backend's substitution.

The three [inner, C] weights (and biases, where there are any) are concatenated once into a [3*inner, C]
tensor, and to_q / to_k / to_v keep their Parameters as views into it: the state dict keeps its keys and
values, in-place loads and edits of any projection reach the fused weight, and no weight is stored twice.
A conversion (`.to(dtype)`, `.half()`, `.cuda()`) or a deepcopy handles each Parameter on its own, so
`_apply` and `__setstate__` fuse again afterwards. The split into heads is a strided view of the GEMM's
output, which the attention core reads in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.models.blocks import Attention, BasicTransformerBlock, SpatialSelfAttention
from runtime.models.substitution import rebind, replace_modules


class FusedQKVAttention(Attention):
    """Attention whose self-attention path runs one [3*inner, C] projection; cross-attention (a context
    given) is unchanged."""

    def _fuse_projections(self) -> None:
        projections = (self.to_q, self.to_k, self.to_v)
        weight = torch.cat([p.weight.detach() for p in projections])
        for p, part in zip(projections, weight.chunk(3)):
            p.weight.data = part
        self.qkv_weight = weight
        self.qkv_bias = None
        if self.to_q.bias is not None:
            bias = torch.cat([p.bias.detach() for p in projections])
            for p, part in zip(projections, bias.chunk(3)):
                p.bias.data = part
            self.qkv_bias = bias

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._fuse_projections()
        return result

    def __setstate__(self, state):
        # copy.deepcopy and pickle copy each Parameter on its own: share one storage again.
        super().__setstate__(state)
        self._fuse_projections()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            return super().forward(x, context)
        batch, tokens, _ = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        out = self.core(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.to_out[0](out)


class FusedQKVSpatialSelfAttention(SpatialSelfAttention, FusedQKVAttention):
    """The VAE's mid-block attention with the fused projection (its forward calls the one above)."""


# Exact type -> its fused counterpart.
FUSED = {Attention: FusedQKVAttention, SpatialSelfAttention: FusedQKVSpatialSelfAttention}


def _self_attentions(model: torch.nn.Module) -> set[int]:
    """ids of the modules that attend over their own input: a transformer block's attn1 (unless it is
    `only_cross_attention`) and the VAE's attention. attn2 reads the text context even where the context
    happens to be as wide as the tokens, so it is never one of them. Projections must agree on bias."""
    found = [b.attn1 for b in model.modules() if isinstance(b, BasicTransformerBlock) and not b.only_cross_attention]
    found += [m for m in model.modules() if type(m) is SpatialSelfAttention]
    return {
        id(m) for m in found if type(m) in FUSED and len({p.bias is not None for p in (m.to_q, m.to_k, m.to_v)}) == 1
    }


def _fused(module: Attention) -> Attention:
    new = rebind(module, FUSED[type(module)])
    new._fuse_projections()
    return new


def fuse_qkv(model: torch.nn.Module):
    """Substitute every self-attention of `model` by its fused-projection counterpart."""
    self_attentions = _self_attentions(model)
    return replace_modules(model, lambda m: id(m) in self_attentions, _fused)
