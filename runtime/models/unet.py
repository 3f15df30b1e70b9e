"""Our UNet2DConditionModel: Stable Diffusion 1.x / 2.x (incl. 9-channel inpainting) and SDXL shapes.

Built from a diffusers UNet `config.json` dict; parameter names are identical to diffusers, so a
diffusers state dict loads with `load_state_dict(strict=True)` and no conversion.

forward(sample, timestep, encoder_hidden_states) has no host syncs and no branching on tensor
values, so it can be captured in a CUDA graph (pass the timestep as a device tensor for that).

project_context(encoder_hidden_states) runs every cross-attention layer's K and V projection as one GEMM
(runtime/models/cross_kv.py); passing its result as forward's `context_kv` skips those projections, so a
request projects its text context once instead of at every step, with the same math. Likewise forward
runs every resnet's time projection as one GEMM (runtime/models/time_projection.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models import cross_kv
from runtime.models.blocks import (
    Downsample2D,
    ProjectedContext,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    check_silu,
    config_from_dict,
    timestep_embedding,
)
from runtime.models.config_checks import Flag, Int, IntList, Number, check_fields
from runtime.models.layers import GroupNorm
from runtime.models.time_projection import TimeProjection, time_resnets

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys for features we do not implement: accepted only at these (inert) values.
_INERT = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses a non-None value
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
}
# Keys that cannot change the computation of the supported blocks: dropout (inference), and
# options diffusers only passes to block types we reject (SimpleCrossAttn*, ResnetDownsample*,
# the "text" addition embedding).
_IGNORED = frozenset(
    {
        "dropout",
        "resnet_skip_time_act",
        "resnet_out_scale_factor",
        "cross_attention_norm",
        "mid_block_only_cross_attention",
        "addition_embed_type_num_heads",
    }
)


# Type and range of each size and flag field (runtime/models/config_checks.py), checked first.
_FIELD_RULES = {
    "sample_size": Int(1, 1024, optional=True, pair=True),
    "in_channels": Int(1, 64),
    "out_channels": Int(1, 64),
    "center_input_sample": Flag(),
    "flip_sin_to_cos": Flag(),
    "freq_shift": Number(-1, 1),
    "only_cross_attention": Flag(per_level=True),
    "block_out_channels": IntList(1, 8192),
    "layers_per_block": Int(1, 16, per_level=True),
    "downsample_padding": Int(0, 8),
    "mid_block_scale_factor": Number(0, 1e3, low_open=True),
    "norm_num_groups": Int(1, 1024),
    "norm_eps": Number(0, 1, low_open=True),
    "cross_attention_dim": Int(1, 16384, per_level=True),
    "transformer_layers_per_block": Int(1, 64, per_level=True),
    "attention_head_dim": Int(1, 1024, per_level=True),
    "use_linear_projection": Flag(),
    "upcast_attention": Flag(),
    "addition_time_embed_dim": Int(1, 4096, optional=True),
    "projection_class_embeddings_input_dim": Int(1, 65536, optional=True),
    "time_embedding_dim": Int(1, 65536, optional=True),
    "conv_in_kernel": Int(1, 15),
    "conv_out_kernel": Int(1, 15),
}


def _per_level(value, levels: int, name: str) -> tuple:
    """Expand an int/bool per-UNet value to one entry per resolution level, checking the length."""
    if isinstance(value, tuple):
        if len(value) != levels:
            raise ValueError(
                f"UNetConfig: config field {name!r} = {value!r} has {len(value)} entries, "
                f"expected one per level ({levels})"
            )
        return value
    return (value,) * levels


@dataclass(frozen=True)
class UNetConfig:
    """The diffusers UNet2DConditionModel config, restricted to what Stable Diffusion uses."""

    sample_size: int | tuple[int, int] | None = None
    """Latent size the model was trained at (64 for SD 1.5 = 512 px). Informational only."""
    in_channels: int = 4
    """Input latent channels: 4, or 9 for inpainting (latents + mask + masked-image latents)."""
    out_channels: int = 4
    """Predicted channels (noise / v)."""
    center_input_sample: bool = False
    """If True the input is mapped x -> 2x - 1 first."""
    flip_sin_to_cos: bool = True
    """Timestep embedding order: cos first (True, SD) or sin first."""
    freq_shift: float = 0
    """`downscale_freq_shift` of the sinusoidal timestep embedding (SD: 0)."""
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    """One entry per level, each CrossAttnDownBlock2D or DownBlock2D."""
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    """UNetMidBlock2DCrossAttn, or None for no mid block."""
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    """One entry per level (deepest first), each CrossAttnUpBlock2D or UpBlock2D."""
    only_cross_attention: bool | tuple[bool, ...] = False
    """Per level (or for all): attn1 attends to the text context too instead of to the image."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    """Channels of each resolution level."""
    layers_per_block: int | tuple[int, ...] = 2
    """ResNet layers per down block (up blocks get one more)."""
    downsample_padding: int = 1
    """Padding of the stride-2 downsampling convs."""
    mid_block_scale_factor: float = 1.0
    """The mid block's resnets divide their output by this."""
    act_fn: str = "silu"
    """Activation; only SiLU is supported."""
    norm_num_groups: int = 32
    """GroupNorm groups everywhere."""
    norm_eps: float = 1e-5
    """GroupNorm epsilon of the resnets and the output norm (attention GroupNorms use 1e-6)."""
    cross_attention_dim: int | tuple[int, ...] = 1280
    """Width of the text context (768 SD 1.x, 1024 SD 2.x, 2048 SDXL), for all or per level."""
    transformer_layers_per_block: int | tuple[int, ...] = 1
    """BasicTransformerBlocks per Transformer2DModel, for all or per level (SDXL: 1, 2, 10)."""
    attention_head_dim: int | tuple[int, ...] = 8
    """Despite its name, the NUMBER of attention heads per level (diffusers' rule when
    num_attention_heads is None, which it always is): SD 1.x 8 heads, SD 2.x (5, 10, 20, 20)."""
    use_linear_projection: bool = False
    """Transformer proj_in/proj_out as Linear (SD 2.x, SDXL) instead of 1x1 conv (SD 1.x)."""
    upcast_attention: bool = False
    """Compute attention in fp32 whatever the model dtype (SD 2.1 needs it in fp16)."""
    addition_embed_type: str | None = None
    """None, or "text_time" (SDXL: pooled text embedding + size/crop ids added to the time embedding)."""
    addition_time_embed_dim: int | None = None
    """SDXL: sinusoidal width per time id (256)."""
    projection_class_embeddings_input_dim: int | None = None
    """SDXL: input width of add_embedding (pooled text width + 6 * addition_time_embed_dim)."""
    time_embedding_dim: int | None = None
    """Width of the time embedding; None means 4 * block_out_channels[0]."""
    conv_in_kernel: int = 3
    """Kernel size of conv_in (odd)."""
    conv_out_kernel: int = 3
    """Kernel size of conv_out (odd)."""

    @classmethod
    def from_dict(cls, raw: dict) -> UNetConfig:
        """Parse a diffusers UNet config.json dict; unknown or unsupported fields raise ValueError."""
        return config_from_dict(cls, raw, ("UNet2DConditionModel",), _INERT, _IGNORED)

    def __post_init__(self):
        check_fields(self, _FIELD_RULES)
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("UNetConfig: config field 'block_out_channels' is empty")
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            if len(types) != levels:
                raise ValueError(
                    f"UNetConfig: config field {name!r} = {types!r} must have one entry per "
                    f"block_out_channels entry ({levels})"
                )
            for block_type in types:
                if block_type not in allowed:
                    raise ValueError(f"UNetConfig: config field {name!r} contains {block_type!r}; supported: {allowed}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(
                f"UNetConfig: config field 'mid_block_type' = {self.mid_block_type!r} is not "
                f"supported (supported: {MID_BLOCK_TYPES})"
            )
        check_silu("UNetConfig", self.act_fn)
        if not isinstance(self.norm_num_groups, int) or self.norm_num_groups <= 0:
            raise ValueError(
                f"UNetConfig: config field 'norm_num_groups' = {self.norm_num_groups!r} is not "
                "supported (a positive int is required)"
            )
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: config field 'norm_num_groups' = {self.norm_num_groups} does "
                    f"not divide block_out_channels entry {channels}"
                )
        for name in (
            "only_cross_attention",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
        ):
            for entry in _per_level(getattr(self, name), levels, name):
                if isinstance(entry, tuple):
                    raise ValueError(
                        f"UNetConfig: config field {name!r} = {getattr(self, name)!r}: nested "
                        "per-layer lists are not supported"
                    )
        for channels, heads in zip(self.block_out_channels, self.heads_per_level):
            if heads <= 0 or channels % heads:
                raise ValueError(
                    f"UNetConfig: config field 'attention_head_dim' gives {heads} heads, which "
                    f"does not divide {channels} channels"
                )
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNetConfig: config field 'addition_embed_type' = {self.addition_embed_type!r} "
                "is not supported (supported: None, 'text_time')"
            )
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, name) is None:
                    raise ValueError(f"UNetConfig: addition_embed_type 'text_time' needs config field {name!r}")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"UNetConfig: config field {name!r} = {getattr(self, name)} must be odd")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, name: str) -> tuple:
        """A per-level field as a tuple with one entry per level (down order)."""
        return _per_level(getattr(self, name), self.levels, name)

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        return self.per_level("attention_head_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


@dataclass(frozen=True)
class _AttnSpec:
    """Everything a level's Transformer2DModels need besides channels."""

    heads: int
    num_layers: int
    context_dim: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast_attention: bool

    def build(self, channels: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads,
            channels,
            self.num_layers,
            self.context_dim,
            self.groups,
            self.use_linear_projection,
            self.only_cross_attention,
            self.upcast_attention,
        )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (attn given) or DownBlock2D (attn None): resnets [+ transformers], downsample.

    Returns the new hidden state and the skip connections it produced (one per resnet, plus the
    downsampled state).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        temb_channels: int,
        groups: int,
        eps: float,
        add_downsample: bool,
        downsample_padding: int,
        attn: _AttnSpec | None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
                for i in range(num_layers)
            ]
        )
        if attn is not None:
            self.attentions = nn.ModuleList([attn.build(out_channels) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor):
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""

    def __init__(
        self, channels: int, temb_channels: int, groups: int, eps: float, output_scale_factor: float, attn: _AttnSpec
    ):
        super().__init__()
        self.attentions = nn.ModuleList([attn.build(channels)])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (attn given) or UpBlock2D: each resnet eats one skip connection."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        num_layers: int,
        temb_channels: int,
        groups: int,
        eps: float,
        add_upsample: bool,
        attn: _AttnSpec | None,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        if attn is not None:
            self.attentions = nn.ModuleList([attn.build(out_channels) for _ in range(num_layers)])
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet(nn.Module):
    """Noise-prediction UNet; same parameters and outputs as diffusers' UNet2DConditionModel."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__} (use UNetConfig.from_dict)")
        self.config = config
        channels = config.block_out_channels
        levels = config.levels
        groups, eps = config.norm_num_groups, config.norm_eps
        temb = config.time_embed_dim
        heads = config.heads_per_level
        context_dims = config.per_level("cross_attention_dim")
        layers = config.per_level("layers_per_block")
        transformer_layers = config.per_level("transformer_layers_per_block")
        only_cross = config.per_level("only_cross_attention")

        def attn_spec(level: int) -> _AttnSpec:
            return _AttnSpec(
                heads[level],
                transformer_layers[level],
                context_dims[level],
                groups,
                config.use_linear_projection,
                only_cross[level],
                config.upcast_attention,
            )

        self.conv_in = nn.Conv2d(
            config.in_channels, channels[0], kernel_size=config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2
        )
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(
                DownBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    layers[i],
                    temb,
                    groups,
                    eps,
                    add_downsample=i < levels - 1,
                    downsample_padding=config.downsample_padding,
                    attn=attn_spec(i) if block_type == "CrossAttnDownBlock2D" else None,
                )
            )

        self.mid_block = None
        if config.mid_block_type is not None:
            # diffusers builds the mid block with the deepest level's settings, but its own
            # only_cross_attention default (False).
            mid_attn = dataclasses.replace(attn_spec(levels - 1), only_cross_attention=False)
            self.mid_block = MidBlock(channels[-1], temb, groups, eps, config.mid_block_scale_factor, mid_attn)

        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        for i, block_type in enumerate(config.up_block_types):
            level = levels - 1 - i
            self.up_blocks.append(
                UpBlock(
                    in_channels=reversed_channels[min(i + 1, levels - 1)],
                    prev_output_channels=reversed_channels[max(i - 1, 0)],
                    out_channels=reversed_channels[i],
                    num_layers=layers[level] + 1,
                    temb_channels=temb,
                    groups=groups,
                    eps=eps,
                    add_upsample=i < levels - 1,
                    attn=attn_spec(level) if block_type == "CrossAttnUpBlock2D" else None,
                )
            )

        self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps, activation="silu")
        self.conv_out = nn.Conv2d(
            channels[0],
            config.out_channels,
            kernel_size=config.conv_out_kernel,
            padding=(config.conv_out_kernel - 1) // 2,
        )
        # Context widths the cross-attention layers expect, checked in forward for a clear error.
        attended = [i for i, t in enumerate(config.down_block_types) if t == "CrossAttnDownBlock2D"]
        attended += [levels - 1 - i for i, t in enumerate(config.up_block_types) if t == "CrossAttnUpBlock2D"]
        attended += [levels - 1] if config.mid_block_type is not None else []
        self._context_dims = sorted({context_dims[level] for level in attended})
        # Each cross-attention layer's K, V columns in project_context's output; the stacked weight is built
        # on first use (cross_kv.stacked_weight), so a UNet never projected keeps separate Parameters.
        self._context_kv_width = cross_kv.assign_columns(cross_kv.cross_attentions(self))
        self._context_kv_weight: torch.Tensor | None = None
        # silu(temb) through every resnet's time_emb_proj as one GEMM per forward (time_projection.py).
        self.time_projection = TimeProjection(time_resnets(self))

    def _apply(self, fn, recurse=True):
        # A conversion gives each Parameter storage of its own: drop the old stack rather than keep it
        # alive (the next project_context stacks the converted weights).
        self._context_kv_weight = None
        return super()._apply(fn, recurse)

    def __setstate__(self, state):
        # A deepcopy's Parameters are copies of their own, not views of its copy of the stack.
        super().__setstate__(state)
        self._context_kv_weight = None

    def _check_context(self, encoder_hidden_states: torch.Tensor, batch: int | None) -> None:
        if encoder_hidden_states.dim() != 3 or (batch is not None and encoder_hidden_states.shape[0] != batch):
            raise ValueError(
                f"UNet: encoder_hidden_states must be [B{'' if batch is None else f'={batch}'}, tokens, C], "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if any(encoder_hidden_states.shape[2] != width for width in self._context_dims):
            raise ValueError(
                f"UNet: encoder_hidden_states width {encoder_hidden_states.shape[2]} does not match "
                f"config field cross_attention_dim ({', '.join(map(str, self._context_dims))})"
            )

    def project_context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, N, C] text context -> [B, N, context_kv width]: the K and V of every cross-attention layer,
        from one GEMM. Pass it as `context_kv` with the same context to every step of a request; project
        again after the weights change (a LoRA), as each request does."""
        self._check_context(encoder_hidden_states, None)
        layers = cross_kv.cross_attentions(self)
        if not layers:
            return encoder_hidden_states.new_empty(*encoder_hidden_states.shape[:2], 0)
        self._context_kv_weight = cross_kv.stacked_weight(layers, self._context_kv_weight)
        if encoder_hidden_states.dtype != self._context_kv_weight.dtype:
            raise ValueError(
                f"UNet: encoder_hidden_states is {encoder_hidden_states.dtype}, the UNet's weights are "
                f"{self._context_kv_weight.dtype}"
            )
        return F.linear(encoder_hidden_states, self._context_kv_weight)

    def _batched_timesteps(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """int / float / 0-d / [1] / [B] tensor -> [B] tensor on the sample's device (no host sync)."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(
                f"UNet: timestep must be a number, a 0-d tensor or a [batch={batch}] tensor, "
                f"got shape {tuple(timestep.shape)}"
            )
        return timestep.to(sample.device).reshape(-1).expand(batch)

    def _time_embedding(self, timestep, sample: torch.Tensor, text_embeds, time_ids) -> torch.Tensor:
        config = self.config
        t = self._batched_timesteps(timestep, sample)
        # The sinusoid is always fp32; cast to the model dtype before the MLP, as diffusers does.
        t_emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype))
        if config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError(
                    "UNet: this SDXL-style UNet (addition_embed_type='text_time') needs "
                    "`text_embeds` [B, C] and `time_ids` [B, 6]"
                )
            time_embeds = timestep_embedding(
                time_ids.flatten(), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
            )
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
            add_embeds = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)
            emb = emb + self.add_embedding(add_embeds.to(emb.dtype))
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        context_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample [B, in_channels, h, w], timestep (number, 0-d or [B]), encoder_hidden_states [B, N, C]
        -> prediction [B, out_channels, h, w]. text_embeds / time_ids only for SDXL-style configs.
        context_kv: project_context(encoder_hidden_states), to skip the cross-attention K/V projections."""
        if sample.dim() != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet: sample must be [B, {self.config.in_channels}, h, w], got {tuple(sample.shape)}")
        self._check_context(encoder_hidden_states, sample.shape[0])
        context = encoder_hidden_states
        if context_kv is not None:
            expected = (*encoder_hidden_states.shape[:2], self._context_kv_width)
            if tuple(context_kv.shape) != expected:
                raise ValueError(
                    f"UNet: context_kv must be project_context(encoder_hidden_states), {list(expected)}, "
                    f"got {list(context_kv.shape)}"
                )
            context = ProjectedContext(context_kv)
        emb = self.time_projection(self._time_embedding(timestep, sample, text_embeds, time_ids))

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)

        skips = (x,)
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips

        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)

        # Sizes not divisible by 2**upsamplers: upsample to each skip's exact size (shapes only).
        factor = 2 ** (self.config.levels - 1)
        forward_size = any(dim % factor for dim in sample.shape[-2:])
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            upsample_size = tuple(skips[-1].shape[2:]) if forward_size and block.upsamplers is not None else None
            x = block(x, block_skips, emb, context, upsample_size)

        return self.conv_out(self.conv_norm_out(x))
