"""The resnet blocks and the 1x1 convolutions on the triton backend, by module substitution.

Per resnet, the torch model runs conv1 + its bias add, the time projection add, norm2, conv2 + its bias
add, the shortcut conv + its bias add, and the residual add. Here:
- conv1 runs without its bias, and norm2 reads `shift` = conv1.bias + the resnet's time projection
  ([B, C], the GroupNorm shift contract of runtime/models/layers.py): both adds fold into the norm.
  The UNet's TimeProjection (one GEMM for every resnet) is swapped for TritonTimeProjection, whose GEMM
  bias is the stacked time biases plus the stacked conv1 biases, so the shifts come out of that one GEMM
  (the two bias stacks are views of the Parameters and are added at every call, so LoRA / in-place
  edits of either reach it). The VAE's resnets (no time embedding) use conv1.bias as a [1, C] shift.
- conv2 runs without its bias, and kernels.bias_residual_add computes (shortcut + h + conv2.bias) /
  output_scale_factor in one pass.
- every 1x1 stride-1 conv (conv_shortcut, proj_in / proj_out, the VAE's) is a PointwiseConv2d: a GEMM
  with the bias in its epilogue (pointwise_conv.py).
All substitutes keep the modules' state (rebind): the state-dict keys and values are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import bias_residual_add as residual
from runtime.backends.pointwise_conv import PointwiseConv2d, is_pointwise
from runtime.models.blocks import ProjectedTime, ResnetBlock2D, conv_without_bias
from runtime.models.substitution import rebind, replace_modules
from runtime.models.time_projection import TimeProjection


class TritonTimeProjection(TimeProjection):
    """Every resnet's time projection plus its conv1.bias, from one GEMM: the norm2 shifts."""

    def current_stacks(self) -> dict[str, torch.Tensor]:
        stacks = super().current_stacks()
        stacks["conv1_bias"] = self.stacked("conv1_bias", [conv.bias for conv in self.conv1s])
        return stacks

    def forward(self, temb: torch.Tensor) -> ProjectedTime:
        stacks = self.current_stacks()
        # One small add over sum(C) elements per step, instead of a bias pass over each conv1 output.
        bias = stacks["bias"] + stacks["conv1_bias"]
        return ProjectedTime(F.linear(F.silu(temb), stacks["weight"], bias), includes_conv1_bias=True)


class TritonResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D with its bias and time adds folded into norm2's shift and one residual kernel."""

    def norm2_shift(self, temb: torch.Tensor | ProjectedTime | None) -> torch.Tensor:
        """conv1.bias + the time projection, [B, C] ([1, C] without a time embedding)."""
        if self.time_emb_proj is None:
            return self.conv1.bias[None]
        if isinstance(temb, ProjectedTime) and temb.includes_conv1_bias:
            return temb.for_layer(self)
        return self.time_projection(temb) + self.conv1.bias

    def forward(self, x: torch.Tensor, temb: torch.Tensor | ProjectedTime | None = None) -> torch.Tensor:
        if self.conv1.bias is None or self.conv2.bias is None:  # not a diffusers resnet: nothing to fold
            return super().forward(x, temb)
        h = conv_without_bias(self.conv1, self.norm1(x))
        h = conv_without_bias(self.conv2, self.norm2(h, shift=self.norm2_shift(temb)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if residual.supports(shortcut, h, self.conv2.bias):
            return residual.bias_residual_add(shortcut, h, self.conv2.bias, self.output_scale_factor)
        out = shortcut + (h + self.conv2.bias[None, :, None, None])
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


def _time_projection(old: TimeProjection) -> TritonTimeProjection:
    new = rebind(old, TritonTimeProjection)
    new.stacks = {}
    new.current_stacks()
    return new


def substitute_resnets(model: nn.Module) -> None:
    """Swap `model`'s resnets, its time projection and its 1x1 convolutions for the substitutes above."""
    replace_modules(model, lambda m: type(m) is ResnetBlock2D, lambda old: rebind(old, TritonResnetBlock2D))
    replace_modules(model, lambda m: type(m) is TimeProjection, _time_projection)
    replace_modules(model, is_pointwise, lambda old: rebind(old, PointwiseConv2d))
