"""Every cross-attention layer's K and V from one GEMM, once per request instead of once per step.

The text context is the same at every denoising step, so the projections that read it (to_k and to_v of
each transformer block's attn2, and of attn1 where only_cross_attention) give the same result at every
step. UNet.project_context runs all of them as one GEMM of the context against their weights stacked
row-wise, [B, N, C] @ [sum_l 2 * inner_l, C]^T, and each layer reads its K and V as column slices of the
result (blocks.ProjectedContext).

The stacked weight is not a second copy: when it is built, every to_k / to_v Parameter is re-pointed to
its row block of it (as runtime/backends/fused_qkv.py does for self-attention), so in-place edits (a LoRA,
load_state_dict) reach it. Whatever gives a Parameter storage of its own (`.to()`,
`load_state_dict(assign=True)`, a deepcopy) breaks that sharing; `stacked_weight` checks it on every call
and stacks again where it is broken, so the K and V never come from stale weights.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.models.blocks import Attention, BasicTransformerBlock


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


def _shares(projections: list[nn.Linear], stacked: torch.Tensor | None) -> bool:
    """Whether every projection's weight is still its row block of `stacked`."""
    if stacked is None:
        return False
    row = 0
    for p in projections:
        w = p.weight
        if (
            w.device != stacked.device
            or w.dtype != stacked.dtype
            or w.stride() != stacked.stride()
            or row + w.shape[0] > stacked.shape[0]
            or w.data_ptr() != stacked[row].data_ptr()
        ):
            return False
        row += w.shape[0]
    return row == stacked.shape[0]


def stacked_weight(layers: list[Attention], stacked: torch.Tensor | None) -> torch.Tensor:
    """[sum_l 2 * inner_l, C]: `stacked` if every layer's to_k / to_v weights still live in it, else a new
    stack of their current values, with the Parameters re-pointed into it."""
    projections = _projections(layers)
    if _shares(projections, stacked):
        return stacked
    # Outside inference mode: the Parameters become views of this tensor, and a later in-place edit
    # outside inference mode (a LoRA under no_grad) must be allowed on them.
    with torch.inference_mode(False), torch.no_grad():
        stacked = torch.cat([p.weight.detach() for p in projections])
        row = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight.data = stacked[row : row + rows]
            row += rows
    return stacked
