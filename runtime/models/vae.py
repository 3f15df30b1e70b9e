"""Our AutoencoderKL (the Stable Diffusion VAE), state-dict compatible with diffusers.

encode(images in [-1, 1]) -> mean of the latent distribution, NOT multiplied by scaling_factor;
decode(z) expects z already divided by config.scaling_factor and returns images in about [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    check_silu,
    config_from_dict,
)
from runtime.models.config_checks import Flag, Int, IntList, Number, check_fields
from runtime.models.layers import GroupNorm

# The VAE's own norms use eps 1e-6 regardless of config (hard-coded in diffusers' Encoder/Decoder).
_EPS = 1e-6

# Latent normalisations of other model families (SD3, Flux, ...): the pipeline would need them,
# and we only know how to scale SD latents, so they must be absent.
_INERT = {
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


# Type and range of each size and flag field (runtime/models/config_checks.py), checked first.
_FIELD_RULES = {
    "in_channels": Int(1, 64),
    "out_channels": Int(1, 64),
    "block_out_channels": IntList(1, 8192),
    "layers_per_block": Int(1, 16),
    "latent_channels": Int(1, 64),
    "norm_num_groups": Int(1, 1024),
    "sample_size": Int(1, 16384, pair=True),
    "scaling_factor": Number(0, 100, low_open=True),
    "force_upcast": Flag(),
    "use_quant_conv": Flag(),
    "use_post_quant_conv": Flag(),
    "mid_block_add_attention": Flag(),
}


@dataclass(frozen=True)
class VAEConfig:
    """The diffusers AutoencoderKL config, restricted to what Stable Diffusion uses."""

    in_channels: int = 3
    """Image channels in."""
    out_channels: int = 3
    """Image channels out."""
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    """Encoder blocks, one per level; all must be DownEncoderBlock2D."""
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    """Decoder blocks, one per level; all must be UpDecoderBlock2D."""
    block_out_channels: tuple[int, ...] = (64,)
    """Channels per level (SD: 128, 256, 512, 512)."""
    layers_per_block: int = 1
    """ResNet layers per encoder block (decoder blocks get one more). SD: 2."""
    act_fn: str = "silu"
    """Activation; only SiLU is supported."""
    latent_channels: int = 4
    """Channels of the latent."""
    norm_num_groups: int = 32
    """GroupNorm groups everywhere."""
    sample_size: int | tuple[int, int] = 32
    """Image size used by diffusers' tiling heuristics. Informational only."""
    scaling_factor: float = 0.18215
    """Latents are multiplied by this before the UNet and divided by it before decode (SD 1/2)."""
    force_upcast: bool = True
    """The VAE overflows in fp16 and must run in fp32 (SD 1/2 VAEs, SDXL's). Runtimes read this
    to choose the VAE's dtype; the module itself computes in whatever dtype it is given."""
    use_quant_conv: bool = True
    """Whether the 1x1 quant_conv follows the encoder."""
    use_post_quant_conv: bool = True
    """Whether the 1x1 post_quant_conv precedes the decoder."""
    mid_block_add_attention: bool = True
    """Whether the encoder and decoder mid blocks have their self-attention."""

    @classmethod
    def from_dict(cls, raw: dict) -> VAEConfig:
        """Parse a diffusers VAE config.json dict; unknown or unsupported fields raise ValueError."""
        return config_from_dict(cls, raw, ("AutoencoderKL",), _INERT, frozenset())

    def __post_init__(self):
        check_fields(self, _FIELD_RULES)
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("VAEConfig: config field 'block_out_channels' is empty")
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", self.up_block_types, "UpDecoderBlock2D"),
        ):
            if len(types) != levels:
                raise ValueError(
                    f"VAEConfig: config field {name!r} = {types!r} must have one entry per "
                    f"block_out_channels entry ({levels})"
                )
            for block_type in types:
                if block_type != allowed:
                    raise ValueError(
                        f"VAEConfig: config field {name!r} contains {block_type!r}; only {allowed!r} is supported"
                    )
        check_silu("VAEConfig", self.act_fn)
        if not isinstance(self.norm_num_groups, int) or self.norm_num_groups <= 0:
            raise ValueError(
                f"VAEConfig: config field 'norm_num_groups' = {self.norm_num_groups!r} is not "
                "supported (a positive int is required)"
            )
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"VAEConfig: config field 'norm_num_groups' = {self.norm_num_groups} does "
                    f"not divide block_out_channels entry {channels}"
                )
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(
                f"VAEConfig: config field 'layers_per_block' = {self.layers_per_block!r} must be a positive int"
            )


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, [attention], resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, _EPS)]) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
                for i in range(num_layers)
            ]
        )
        # The encoder downsamples with padding 0 (asymmetric pad inside Downsample2D).
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image -> 2 * latent_channels moments (mean, logvar) at 1 / 2**(levels-1) resolution."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        levels = len(channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(
                    channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, add_downsample=i < levels - 1
                )
                for i in range(levels)
            ]
        )
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=_EPS, activation="silu")
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """Latent -> image at 2**(levels-1) times the resolution."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        levels = len(channels)
        reversed_channels = channels[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(i - 1, 0)],
                    reversed_channels[i],
                    config.layers_per_block + 1,
                    groups,
                    add_upsample=i < levels - 1,
                )
                for i in range(levels)
            ]
        )
        self.conv_norm_out = GroupNorm(groups, channels[0], eps=_EPS, activation="silu")
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    """The KL autoencoder; same parameters and outputs as diffusers' AutoencoderKL."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"AutoencoderKL expects a VAEConfig, got {type(config).__name__} (use VAEConfig.from_dict)")
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1) if config.use_post_quant_conv else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, in_channels, H, W] in [-1, 1] -> latent mean [B, latent_channels, ~H/8, ~W/8], unscaled."""
        return self.encode_moments(images)[0]

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> the posterior's (mean, logvar), each [B, latent_channels, ~H/8, ~W/8]: quant_conv(encoder(x))
        split in two along channels, as diffusers' DiagonalGaussianDistribution; img2img samples from both."""
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode: images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}"
            )
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent_channels, h, w] (already divided by scaling_factor) -> images [B, out_channels, 8h, 8w]."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode: z must be [B, {self.config.latent_channels}, h, w], got {tuple(z.shape)}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
