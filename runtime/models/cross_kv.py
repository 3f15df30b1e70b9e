"""Every cross-attention layer's K and V from one GEMM, once per request instead of once per step.

The text context is the same at every denoising step, so the projections that read it (to_k and to_v of
each transformer block's attn2, and of attn1 where only_cross_attention) give the same result at every
step. UNet.project_context runs all of them as one GEMM of the context against their weights stacked
row-wise, [B, N, C] @ [sum_l 2 * inner_l, C]^T, and each layer reads its K and V as column slices of the
result (blocks.ProjectedContext).

The stacked weight is not a second copy: every to_k / to_v Parameter is a view of its row block of it, and
the stack is rebuilt where a conversion or a deepcopy broke that sharing (runtime/models/stacked_rows.py).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.models.blocks import Attention, BasicTransformerBlock
from runtime.models.stacked_rows import stack_rows


def cross_attentions(model: nn.Module) -> list[Attention]:
    """The attention layers that read the text context, in module order."""
    layers = []
    for block in model.modules():
        if isinstance(block, BasicTransformerBlock):
            if block.only_cross_attention:
                layers.append(block.attn1)
            layers.append(block.attn2)
    return layers


def assign_columns(layers: list[Attention]) -> int:
    """Give each layer its K, V columns in the projection, one after the other; returns the total width."""
    start = 0
    for layer in layers:
        if layer.to_k.bias is not None or layer.to_v.bias is not None:
            raise ValueError("cross-attention K/V with a bias is not supported by the stacked projection")
        layer.context_kv_start = start
        start += 2 * layer.heads * layer.head_dim
    return start


def _projections(layers: list[Attention]) -> list[nn.Linear]:
    """to_k and to_v of each layer, in the order of their columns."""
    ordered = sorted(layers, key=lambda layer: layer.context_kv_start)
    return [p for layer in ordered for p in (layer.to_k, layer.to_v)]


def stacked_weight(layers: list[Attention], stacked: torch.Tensor | None) -> torch.Tensor:
    """[sum_l 2 * inner_l, C]: `stacked` if every layer's to_k / to_v weights still live in it, else a new
    stack of their current values, with the Parameters re-pointed into it (stacked_rows.py)."""
    return stack_rows([p.weight for p in _projections(layers)], stacked)
