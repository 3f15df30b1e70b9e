"""1x1 stride-1 convolutions as a GEMM with the bias in its epilogue: the triton backend's substitution.

A 1x1 convolution of a channels_last input is a matrix product over the NHWC memory: [B*H*W, C_in] @
[C_out, C_in]^T. The channels_last [B, C, H, W] tensor permuted to [B, H, W, C] is a free, contiguous
view, so F.linear runs it as one cuBLAS(Lt) GEMM with the bias added in the epilogue (one launch), where
cuDNN's convolution takes no bias and ATen adds it in a second pass. The [B, H, W, C_out] result permuted
back is the channels_last NCHW tensor the convolution would have returned. Any other layout runs the
convolution itself: the same result, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_pointwise(conv: nn.Module) -> bool:
    """A plain 1x1, stride-1, unpadded, ungrouped nn.Conv2d (proj_in / proj_out, conv_shortcut, ...)."""
    return type(conv) is nn.Conv2d and has_pointwise_geometry(conv)


def has_pointwise_geometry(conv: nn.Conv2d) -> bool:
    """1x1, stride 1, unpadded, ungrouped: whatever nn.Conv2d subclass carries it."""
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class PointwiseConv2d(nn.Conv2d):
    """nn.Conv2d (1x1) whose channels_last inputs run as F.linear on the NHWC view; same state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:  # the conv's own error names what is wrong
            return super().forward(x)
        nhwc = x.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            return super().forward(x)
        # weight[:, :, 0, 0] is a [C_out, C_in] view whatever the weight's memory format.
        return F.linear(nhwc, self.weight[:, :, 0, 0], self.bias).permute(0, 3, 1, 2)
