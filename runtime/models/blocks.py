"""Building blocks shared by our UNet and VAE, state-dict compatible with diffusers.

Each class mirrors the diffusers module of the same name (ResnetBlock2D, Downsample2D, Upsample2D,
Attention, BasicTransformerBlock, Transformer2DModel, ...) in parameter names and numerics, but
only for the configurations Stable Diffusion uses. Every GroupNorm is `layers.GroupNorm` (with
SiLU fused where diffusers applies SiLU right after the norm) and every attention goes through an
`AttentionCore` submodule named `core`, so a backend can swap both for kernels.

Also here: `config_from_dict`, the strict diffusers-config parser both model configs use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.layers import AttentionCore, GroupNorm

# diffusers calls SiLU "swish" in some defaults; both are the same function.
SILU_NAMES = ("silu", "swish")


# ----------------------------------------------------------------------------- config parsing


def _freeze(value):
    """JSON lists -> tuples (recursively), so frozen configs stay hashable and comparable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_dict(
    cls, raw: Mapping, class_names: tuple[str, ...], inert: Mapping[str, tuple], ignored: frozenset[str]
):
    """Build the frozen dataclass `cls` from a diffusers config.json dict, strictly.

    - keys starting with "_" are diffusers bookkeeping (`_class_name`, `_diffusers_version`,
      `_name_or_path`, `_use_default_values`) and are skipped, except that a `_class_name` other
      than `class_names` is an error (a VAE config handed to the UNet, say);
    - keys in `ignored` do not change the computation of the supported models (dropout, options
      read only by block types we reject) and are skipped;
    - keys in `inert` name features we do not implement: accepted only at the listed values;
    - every other key must be a field of `cls`; anything else raises ValueError naming it.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(raw).__name__}")
    class_name = raw.get("_class_name")
    if class_name is not None and class_name not in class_names:
        raise ValueError(f"{cls.__name__}: config `_class_name` is {class_name!r}, expected one of {class_names}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in inert:
            if _freeze(value) not in inert[key]:
                raise ValueError(
                    f"{cls.__name__}: config field {key!r} = {value!r} is not supported (supported: {inert[key]})"
                )
            continue
        if key not in fields:
            raise ValueError(f"{cls.__name__}: config field {key!r} = {value!r} is not supported")
        kwargs[key] = _freeze(value)
    return cls(**kwargs)


def check_silu(owner: str, act_fn: str) -> None:
    if act_fn not in SILU_NAMES:
        raise ValueError(f"{owner}: config field 'act_fn' = {act_fn!r} is not supported (only 'silu')")


# ----------------------------------------------------------------------------- time embedding


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of a [N] tensor of (possibly fractional) timesteps -> [N, dim], fp32.

    Same formula as diffusers' get_timestep_embedding. The frequencies are rebuilt on the device
    each call (no buffer, so casting the model to fp16 cannot degrade them, and no host sync).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding with act_fn='silu')."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------- resnet, resampling


@dataclass(frozen=True)
class ProjectedTime:
    """silu(temb) already through every resnet's time_emb_proj, from one GEMM (time_projection.py).

    `values` is [B, sum over resnets of out_channels]; a resnet's projection is the out_channels columns
    from its `time_proj_start`. `includes_conv1_bias`: each slice also holds that resnet's conv1.bias (a
    backend that adds both as one shift), so conv1 must then run without its bias. Passed where temb goes.
    """

    values: torch.Tensor
    includes_conv1_bias: bool = False

    def for_layer(self, resnet: ResnetBlock2D) -> torch.Tensor:
        """[B, out_channels]: this resnet's columns."""
        start = getattr(resnet, "time_proj_start", None)
        if start is None:
            raise ValueError("a ProjectedTime reached a resnet that is not one of its UNet's")
        return self.values[:, start : start + resnet.time_emb_proj.out_features]


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` with its bias left out (a caller adds the bias in a pass it makes anyway)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


class ResnetBlock2D(nn.Module):
    """GroupNorm+SiLU -> conv -> (+ time embedding) -> GroupNorm+SiLU -> conv, plus the shortcut.

    diffusers ResnetBlock2D with time_embedding_norm="default"; `temb_channels=None` (the VAE)
    drops the time projection. Dropout sits between norm2 and conv2 in diffusers: identity at
    inference, so it is left out. temb is the time embedding [B, temb_channels], or the UNet's
    ProjectedTime (every resnet's projection from one GEMM; `time_proj_start` is set by the UNet).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, activation="silu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )
        # This resnet's columns in the UNet's ProjectedTime (set by the UNet).
        self.time_proj_start: int | None = None

    def time_projection(self, temb: torch.Tensor | ProjectedTime) -> torch.Tensor:
        """time_emb_proj(silu(temb)) [B, out_channels] (plus conv1.bias where the ProjectedTime holds it)."""
        if isinstance(temb, ProjectedTime):
            return temb.for_layer(self)
        return self.time_emb_proj(F.silu(temb))

    def conv1_and_time(self, h: torch.Tensor, temb: torch.Tensor | ProjectedTime | None) -> torch.Tensor:
        """conv1(h) + the time projection, per channel."""
        if self.time_emb_proj is None:
            return self.conv1(h)
        shift = self.time_projection(temb)[:, :, None, None]
        if isinstance(temb, ProjectedTime) and temb.includes_conv1_bias:
            return conv_without_bias(self.conv1, h) + shift
        return self.conv1(h) + shift

    def forward(self, x: torch.Tensor, temb: torch.Tensor | ProjectedTime | None = None) -> torch.Tensor:
        h = self.conv1_and_time(self.norm1(x), temb)
        h = self.conv2(self.norm2(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 (the VAE encoder) pads right/bottom by one first, as diffusers."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to an explicit `output_size`) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


# ----------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class ProjectedContext:
    """The text context already through every cross-attention layer's to_k and to_v (UNet.project_context).

    `kv` is [B, N, sum over layers of 2 * inner]; a layer's K and V are the `inner` columns from its
    `context_kv_start`, then the next `inner`. Passed where a context goes, so the blocks in between
    hand it on unchanged.
    """

    kv: torch.Tensor

    def key_value(self, layer: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        start = getattr(layer, "context_kv_start", None)
        if start is None:
            raise ValueError("a ProjectedContext reached an attention layer that is not one of its UNet's")
        inner = layer.heads * layer.head_dim
        return self.kv[..., start : start + inner], self.kv[..., start + inner : start + 2 * inner]


class Attention(nn.Module):
    """Multi-head attention over token sequences [B, N, C] (diffusers `Attention`, SD subset).

    q, k, v come from to_q / to_k / to_v; heads are split as views (no copy) and handed to the
    swappable `core`; to_out.0 projects back. `context=None` means self-attention; a
    `ProjectedContext` gives K and V already projected (its columns for this layer), so to_k / to_v
    do not run. `upcast` (SD 2.1's upcast_attention) is handed to the core, which keeps scores in fp32.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        # diffusers has Dropout at index 1; index 0 is all the state dict needs.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.core = AttentionCore(upcast)
        # Where this layer's K and V start in a ProjectedContext; set by the UNet for its cross-attentions.
        self.context_kv_start: int | None = None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | ProjectedContext | None = None) -> torch.Tensor:
        q = self._split_heads(self.to_q(x))
        if isinstance(context, ProjectedContext):
            k, v = context.key_value(self)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        k, v = self._split_heads(k), self._split_heads(v)
        out = self.core(q, k, v)
        batch, _, tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.to_out[0](out)


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over pixels, residual.

    Keys match current diffusers: group_norm, to_q, to_k, to_v, to_out.0 (all with bias).
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, channels, height, width = x.shape
        # GroupNorm over [B, C, H, W] equals diffusers' GroupNorm over [B, C, H*W].
        h = self.group_norm(x).view(batch, channels, height * width).transpose(1, 2)
        h = super().forward(h)
        return h.transpose(1, 2).reshape(batch, channels, height, width) + x


class GEGLU(nn.Module):
    """proj -> split in two halves -> first * gelu(second) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward; `net` indices 0 and 2 match diffusers (index 1 is its Dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention (attn1), cross-attention (attn2), GEGLU feed-forward.

    `only_cross_attention` makes attn1 attend to the context as well (diffusers semantics).
    """

    def __init__(
        self, dim: int, heads: int, head_dim: int, context_dim: int, only_cross_attention: bool, upcast_attention: bool
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            dim, heads, head_dim, context_dim=context_dim if only_cross_attention else None, upcast=upcast_attention
        )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out -> + input.

    proj_in/proj_out are 1x1 convs (SD 1.x) or Linear layers (SD 2.x, use_linear_projection).
    """

    def __init__(
        self,
        heads: int,
        channels: int,
        num_layers: int,
        context_dim: int,
        groups: int,
        use_linear_projection: bool,
        only_cross_attention: bool,
        upcast_attention: bool,
    ):
        super().__init__()
        if channels % heads:
            raise ValueError(
                f"attention: {channels} channels cannot be split into {heads} heads "
                "(config field 'attention_head_dim' / number of heads)"
            )
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
            self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    channels, heads, channels // heads, context_dim, only_cross_attention, upcast_attention
                )
                for _ in range(num_layers)
            ]
        )

    def tokens(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """GroupNorm -> proj_in -> the transformer blocks: the [B, H*W, C] tokens proj_out reads."""
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        return h

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.tokens(x, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        # Back to [B, C, H, W] in x's layout: the permuted view already is channels_last, so a channels_last
        # model (the triton backend) copies nothing here; an NCHW one gets the contiguous tensor diffusers makes.
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x
