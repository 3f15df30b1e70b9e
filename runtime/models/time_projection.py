"""Every resnet's time projection from one GEMM per UNet forward, instead of a SiLU and a GEMM per resnet.

Each of the UNet's resnets adds time_emb_proj(silu(temb)) to its conv1 output, and all of them read the
same temb. UNet.forward runs silu(temb) once and all the projections as one GEMM against their weights
stacked row-wise, [B, T] @ [sum_r C_r, T]^T + the stacked biases, and each resnet reads its columns
(blocks.ProjectedTime). The stacks are views, not copies: every time_emb_proj weight and bias is a row
block of them, rebuilt where a conversion or a deepcopy broke that sharing (stacked_rows.py).

A backend may substitute the module (TimeProjection holds no Parameters of its own: its state-dict keys
are none) to fold more per-resnet vectors into the same GEMM, as the triton backend does with conv1.bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.blocks import ProjectedTime, ResnetBlock2D
from runtime.models.stacked_rows import stack_rows


def time_resnets(model: nn.Module) -> list[ResnetBlock2D]:
    """The resnets that read the time embedding, in module order."""
    return [m for m in model.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]


class TimeProjection(nn.Module):
    """silu(temb) [B, T] -> ProjectedTime: every resnet's time_emb_proj, from one GEMM."""

    def __init__(self, resnets: list[ResnetBlock2D]):
        super().__init__()
        start = 0
        for resnet in resnets:
            if resnet.time_emb_proj.bias is None:
                raise ValueError("a resnet time projection without a bias is not supported by the stacked GEMM")
            resnet.time_proj_start = start
            start += resnet.time_emb_proj.out_features
        self.width = start
        # Plain lists, not submodules: the layers stay the resnets' own (no second state-dict key), and
        # a backend's substitution of a resnet shares these same child modules.
        self.projections = [resnet.time_emb_proj for resnet in resnets]
        self.conv1s = [resnet.conv1 for resnet in resnets]
        self.stacks: dict[str, torch.Tensor] = {}
        self.current_stacks()

    def stacked(self, name: str, params: list[nn.Parameter]) -> torch.Tensor:
        """The row-wise stack of `params`, kept under `name` and rebuilt only where its sharing broke."""
        self.stacks[name] = stack_rows(params, self.stacks.get(name))
        return self.stacks[name]

    def current_stacks(self) -> dict[str, torch.Tensor]:
        """The stacks forward reads, rebuilt where their sharing broke (a substitute may add its own)."""
        return {
            "weight": self.stacked("weight", [p.weight for p in self.projections]),
            "bias": self.stacked("bias", [p.bias for p in self.projections]),
        }

    def _apply(self, fn, recurse=True):
        # The UNet's children are converted before this one (registered last): stack the converted
        # Parameters now, so the first step after `.to()` concatenates nothing; forward checks again.
        result = super()._apply(fn, recurse)
        self.stacks = {}
        self.current_stacks()
        return result

    def __setstate__(self, state):
        # A deepcopy's Parameters are copies of their own, not views of its copy of the stacks.
        super().__setstate__(state)
        self.stacks = {}
        self.current_stacks()

    def forward(self, temb: torch.Tensor) -> ProjectedTime | torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # Each resnet projects temb itself, so its weight keeps an ONNX initializer of its own, which
            # export/weight_map.py maps to its state-dict key for deployed LoRAs (TensorRT fuses anyway).
            return temb
        stacks = self.current_stacks()
        return ProjectedTime(F.linear(F.silu(temb), stacks["weight"], stacks["bias"]))
