"""Original (CompVis / A1111) single-file checkpoint layout <-> diffusers state-dict keys.

A single-file SD checkpoint holds the three networks under fixed prefixes:
  model.diffusion_model.      the UNet, LDM names (input_blocks.N.M..., middle_block, output_blocks)
  first_stage_model.          the VAE, LDM names (encoder.down.i.block.j..., 1x1-conv attention)
  cond_stage_model.transformer.text_model.   SD 1.x: a Hugging Face CLIP text model (CLIP ViT-L/14)
  cond_stage_model.model.     SD 2.x: an OpenCLIP text tower (fused q/k/v `in_proj_weight`)
plus training state (model_ema., betas, alphas_cumprod, ...) that inference ignores. SDXL (SGM) files
keep the UNet and VAE prefixes and hold their text encoders under conditioner.embedders.N.:
  conditioner.embedders.0.transformer.text_model.   SDXL base: CLIP ViT-L (Hugging Face layout)
  conditioner.embedders.1.model.     SDXL base: OpenCLIP ViT-bigG (fused q/k/v, `text_projection`
                                     stored as the matrix OpenCLIP multiplies by: the Linear weight transposed)
  conditioner.embedders.0.model.     SDXL refiner: OpenCLIP ViT-bigG, its only text encoder

One function per network maps each diffusers key to the original tensor it comes from
(`OriginalTensor`: the original key and how to transform it). Loading and `to_original_layout`
both use that single map, so the two directions cannot drift apart. Sizes that the shapes reveal
are read from the checkpoint (`infer_configs`); the rest comes from runtime/default_configs.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from runtime.default_configs import (
    SD1_UNET_HEADS,
    SD2_UNET_HEAD_WIDTH,
    TEXT_HEAD_WIDTH,
    default_configs,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD1_TEXT_PREFIX_BARE = "cond_stage_model.transformer."  # a few old merges lack "text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_MARKER = "conditioner.embedders."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
SDXL_ADD_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"  # add_embedding.linear_1: [time dim, pooled + ids]
HF_TEXT_PREFIX = "text_model."  # transformers 4.x CLIPTextModel keys; 5.x drops it


@dataclass(frozen=True)
class OriginalTensor:
    """Where one diffusers tensor lives in an original-layout checkpoint.

    op "copy": the tensor as is; "to_linear": a 1x1 conv weight [O, I, 1, 1] that diffusers keeps
    as a linear weight [O, I] (VAE attention); "qkv": part `part` (q=0, k=1, v=2) of OpenCLIP's
    fused in_proj tensor, split along dim 0; "transpose": a 2-D tensor stored transposed (OpenCLIP's
    text_projection, which it multiplies from the right).
    """

    key: str
    op: str = "copy"
    part: int = 0

    def converted_shape(self, original_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the diffusers tensor made from an original tensor of `original_shape`."""
        shape = tuple(original_shape)
        if self.op == "to_linear" and len(shape) == 4 and shape[2:] == (1, 1):
            return shape[:2]
        if self.op == "qkv" and shape and shape[0] % 3 == 0:
            return (shape[0] // 3,) + shape[1:]
        if self.op == "transpose" and len(shape) == 2:
            return shape[::-1]
        return shape

    def convert(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.op == "to_linear" and tensor.ndim == 4:
            return tensor[:, :, 0, 0]
        if self.op == "qkv":
            return tensor.chunk(3, dim=0)[self.part]
        if self.op == "transpose":
            return tensor.t()
        return tensor


# ----------------------------------------------------------------------------- UNet

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _no_original_name(network: str, key: str) -> KeyError:
    return KeyError(
        f"{network} key {key!r} has no original-layout (CompVis) name: "
        f"only the SD 1.x / 2.x / XL architectures are supported"
    )


def unet_key_map(diffusers_keys: Iterable[str]) -> dict[str, OriginalTensor]:
    """diffusers UNet2DConditionModel key -> original key (without the model.diffusion_model. prefix)."""
    keys = list(diffusers_keys)
    resnets_per_down = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    per_block = len(resnets_per_down) + 1  # L resnets (+ attentions) and one downsampler per down level
    up_with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    mapping = {}
    for key in keys:
        mapping[key] = OriginalTensor(_unet_original_name(key, per_block, up_with_attention))
    return mapping


def _unet_original_name(key: str, per_block: int, up_with_attention: set[int]) -> str:
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            if part == "downsamplers" and rest.startswith("conv."):
                return f"input_blocks.{(block + 1) * per_block}.0.op.{rest[len('conv.') :]}"
            layer = 1 + block * per_block + index
            if part == "resnets":
                return f"input_blocks.{layer}.0.{_rename_head(rest, _UNET_RESNET)}"
            if part == "attentions":
                return f"input_blocks.{layer}.1.{rest}"
        else:
            if part == "upsamplers" and rest.startswith("conv."):
                slot = 2 if block in up_with_attention else 1
                return f"output_blocks.{block * per_block + per_block - 1}.{slot}.{rest}"
            layer = block * per_block + index
            if part == "resnets":
                return f"output_blocks.{layer}.0.{_rename_head(rest, _UNET_RESNET)}"
            if part == "attentions":
                return f"output_blocks.{layer}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets" and index in (0, 1):
            return f"middle_block.{2 * index}.{_rename_head(rest, _UNET_RESNET)}"
        if part == "attentions" and index == 0:
            return f"middle_block.1.{rest}"
    raise _no_original_name("UNet", key)


# ----------------------------------------------------------------------------- VAE

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_map(diffusers_keys: Iterable[str]) -> dict[str, OriginalTensor]:
    """diffusers AutoencoderKL key -> original key (without the first_stage_model. prefix)."""
    keys = list(diffusers_keys)
    levels = len({int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    return {key: _vae_original(key, levels) for key in keys}


def _vae_original(key: str, levels: int) -> OriginalTensor:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return OriginalTensor(key)
    m = re.match(r"(encoder|decoder)\.(.+)", key)
    if not m:
        raise _no_original_name("VAE", key)
    side, rest = m.group(1), m.group(2)
    if rest.startswith(("conv_in.", "conv_out.")):
        return OriginalTensor(key)
    if rest.startswith("conv_norm_out."):
        return OriginalTensor(f"{side}.norm_out.{rest[len('conv_norm_out.') :]}")
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
        direction, block, part, index, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        level = block if direction == "down" else levels - 1 - block  # LDM numbers decoder levels upward
        if part == "resnets":
            tail = tail.replace("conv_shortcut.", "nin_shortcut.")
            return OriginalTensor(f"{side}.{direction}.{level}.block.{index}.{tail}")
        return OriginalTensor(f"{side}.{direction}.{level}.{direction}sample.{tail}")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if m:
        part, index, tail = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets" and index in (0, 1):
            return OriginalTensor(f"{side}.mid.block_{index + 1}.{tail}")
        if part == "attentions" and index == 0:
            renamed = _rename_head(tail, _VAE_ATTENTION)
            op = "to_linear" if tail.endswith(".weight") and not tail.startswith("group_norm.") else "copy"
            return OriginalTensor(f"{side}.mid.attn_1.{renamed}", op)
    raise _no_original_name("VAE", key)


# ----------------------------------------------------------------------------- text encoder

_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def strip_text_model_prefix(key: str) -> str:
    return key[len(HF_TEXT_PREFIX) :] if key.startswith(HF_TEXT_PREFIX) else key


def text_key_map(diffusers_keys: Iterable[str], kind: str) -> dict[str, OriginalTensor]:
    """CLIPTextModel[WithProjection] key (with or without "text_model.") -> original key, without the
    encoder's prefix: HF CLIP names for kind "sd1" (also SDXL's CLIP-L), OpenCLIP names otherwise
    (SD 2.x, SDXL's bigG)."""
    mapping = {}
    for key in diffusers_keys:
        bare = strip_text_model_prefix(key)
        mapping[key] = OriginalTensor(bare) if kind == "sd1" else _open_clip_original(bare)
    return mapping


def _open_clip_original(key: str) -> OriginalTensor:
    if key == "text_projection.weight":
        return OriginalTensor("text_projection", "transpose")
    if key in _OPEN_CLIP_TOP:
        return OriginalTensor(_OPEN_CLIP_TOP[key])
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.group(1), m.group(2)
        qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            return OriginalTensor(
                f"transformer.resblocks.{layer}.attn.in_proj_{qkv.group(2)}", "qkv", "qkv".index(qkv.group(1))
            )
        renamed = _rename_head(rest, _OPEN_CLIP_LAYER)
        if renamed != rest:
            return OriginalTensor(f"transformer.resblocks.{layer}.{renamed}")
    raise _no_original_name("text encoder", key)


# ----------------------------------------------------------------------------- detection and configs


@dataclass(frozen=True)
class Layout:
    """What a single-file checkpoint is: the model kind and where its text encoders live."""

    kind: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    text_prefix: str | None  # prefix in front of the names `text_key_map` produces; None: no text encoder
    text_prefix_2: str | None = None  # SDXL's OpenCLIP bigG (text_encoder_2)


def _sdxl_layout(shapes: Mapping[str, tuple[int, ...]], source: str) -> Layout:
    """SDXL base (CLIP-L at embedders.0, bigG at embedders.1) or refiner (bigG alone at embedders.0);
    anything else under conditioner.embedders. is a partial or foreign file."""

    def holds(prefix):
        return any(k.startswith(prefix) for k in shapes)

    clip_l, big_g, refiner_g = (
        holds(SDXL_CLIP_L_PREFIX),
        holds(SDXL_OPEN_CLIP_PREFIX),
        holds(SDXL_REFINER_OPEN_CLIP_PREFIX),
    )
    if not holds(UNET_PREFIX):
        raise ValueError(
            f"{source}: an SDXL checkpoint (keys under {SDXL_MARKER!r}) without a UNet: no key "
            f"starts with {UNET_PREFIX!r} (a partial file?)"
        )
    if SDXL_ADD_EMBEDDING not in shapes:
        raise ValueError(
            f"{source}: an SDXL checkpoint without the UNet's added-conditioning embedding "
            f"{SDXL_ADD_EMBEDDING!r} (a partial file?)"
        )
    if refiner_g and not clip_l and not big_g:
        return Layout("sdxl-refiner", None, SDXL_REFINER_OPEN_CLIP_PREFIX)
    if clip_l and big_g:
        return Layout("sdxl", SDXL_CLIP_L_PREFIX, SDXL_OPEN_CLIP_PREFIX)
    found = [
        p
        for p, present in (
            (SDXL_CLIP_L_PREFIX, clip_l),
            (SDXL_OPEN_CLIP_PREFIX, big_g),
            (SDXL_REFINER_OPEN_CLIP_PREFIX, refiner_g),
        )
        if present
    ]
    raise ValueError(
        f"{source}: a partial SDXL checkpoint: the base needs CLIP-L under {SDXL_CLIP_L_PREFIX!r} and "
        f"OpenCLIP bigG under {SDXL_OPEN_CLIP_PREFIX!r}, the refiner bigG alone under "
        f"{SDXL_REFINER_OPEN_CLIP_PREFIX!r}; the file has text encoders under "
        f"{', '.join(map(repr, found)) or 'none of these'}"
    )


def detect_layout(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> Layout:
    """SD 1.x vs 2.x vs XL base / refiner from key names and tensor shapes (no tensor data needed)."""
    if any(k.startswith(SDXL_MARKER) for k in shapes):
        return _sdxl_layout(shapes, source)
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        sample = ", ".join(sorted(shapes)[:5]) or "(no tensors)"
        raise ValueError(
            f"{source}: not a Stable Diffusion single-file checkpoint: no key starts with "
            f"{UNET_PREFIX!r} (first keys: {sample})"
        )
    if any(k.startswith(SD2_TEXT_PREFIX + "transformer.resblocks.") for k in shapes):
        kind, text_prefix = "sd2", SD2_TEXT_PREFIX
    elif any(k.startswith(SD1_TEXT_PREFIX) for k in shapes):
        kind, text_prefix = "sd1", SD1_TEXT_PREFIX
    elif any(k.startswith(SD1_TEXT_PREFIX_BARE + "encoder.") for k in shapes):
        kind, text_prefix = "sd1", SD1_TEXT_PREFIX_BARE
    else:
        context = _cross_attention_dim(shapes, source)
        kinds = {768: "sd1", 1024: "sd2"}
        if context not in kinds:
            raise ValueError(
                f"{source}: no text encoder in the file and cross-attention width {context} is "
                f"neither 768 (SD 1.x) nor 1024 (SD 2.x): cannot tell the model kind"
            )
        kind, text_prefix = kinds[context], None
    return Layout(kind, text_prefix)


def _cross_attention_dim(shapes: Mapping[str, tuple[int, ...]], source: str) -> int:
    keys = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    if not keys:
        raise ValueError(f"{source}: no UNet cross-attention weight (*attn2.to_k.weight) under {UNET_PREFIX!r}")
    shape = tuple(shapes[keys[0]])
    if len(shape) != 2:
        raise ValueError(
            f"{source}: tensor {keys[0]!r} has shape {list(shape)}; a cross-attention key "
            f"projection is 2-D [inner, context width]"
        )
    return shape[1]


def _indices(shapes: Mapping[str, tuple], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def _shape(shapes: Mapping[str, tuple], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{source}: expected tensor {key!r} is missing from the checkpoint")
    return tuple(shapes[key])


def infer_configs(shapes: Mapping[str, tuple[int, ...]], layout: Layout, source: str = "checkpoint") -> dict:
    """diffusers-style configs for the networks in the file: the SD defaults of `layout.kind` with
    every size the tensor shapes reveal replaced by the file's value."""
    configs = default_configs(layout.kind)
    configs["unet"].update(_infer_unet(shapes, layout.kind, source))
    configs["vae"].update(_infer_vae(shapes, source))
    if layout.kind.startswith("sdxl"):
        if layout.text_prefix is not None:
            configs["text_encoder"].update(_infer_hf_text(shapes, layout.text_prefix, source))
        configs["text_encoder_2"].update(_infer_open_clip_text(shapes, layout.text_prefix_2, source, all_layers=True))
        _check_sdxl_time_ids(configs, layout.kind, source)
    elif layout.text_prefix is not None:
        configs["text_encoder"].update(_infer_text(shapes, layout, source))
    return configs


def _check_sdxl_time_ids(configs: dict, kind: str, source: str) -> None:
    """add_embedding reads the pooled text (bigG's projection width) and one sinusoid per time id:
    6 for the base, 5 for the refiner. Any other width is not a model we know how to condition."""
    from runtime.default_configs import SDXL_TIME_EMBED_DIM, SDXL_TIME_IDS

    width = configs["unet"]["projection_class_embeddings_input_dim"]
    pooled = configs["text_encoder_2"]["projection_dim"]
    expected = pooled + SDXL_TIME_IDS[kind] * SDXL_TIME_EMBED_DIM
    if width != expected:
        raise ValueError(
            f"{source}: the UNet's added-conditioning input is {width} wide; an {kind} model with a "
            f"{pooled}-wide pooled text embedding has {expected} ({SDXL_TIME_IDS[kind]} time ids x "
            f"{SDXL_TIME_EMBED_DIM})"
        )


def _infer_unet(shapes: Mapping[str, tuple], kind: str, source: str) -> dict:
    p = re.escape(UNET_PREFIX)
    conv_in = _shape(shapes, UNET_PREFIX + "input_blocks.0.0.weight", source)
    input_blocks = _indices(shapes, p + r"input_blocks\.(\d+)\.")
    downsamplers = _indices(shapes, p + r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downsamplers) + 1
    if (len(input_blocks) - levels) % levels:
        raise ValueError(
            f"{source}: {len(input_blocks)} UNet input blocks with {levels} levels do not form a Stable Diffusion UNet"
        )
    per_level = (len(input_blocks) - levels) // levels
    channels, down_types, up_types, depths = [], [], [], set()
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(_shape(shapes, f"{UNET_PREFIX}input_blocks.{first}.0.out_layers.3.weight", source)[0])
        has_attention = UNET_PREFIX + f"input_blocks.{first}.1.proj_in.weight" in shapes
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
        if has_attention:
            depths.add(len(_indices(shapes, p + rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
    for block in range(levels):
        has_attention = UNET_PREFIX + f"output_blocks.{block * (per_level + 1)}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")
    if len(depths) > 1 and not kind.startswith("sdxl"):
        raise ValueError(
            f"{source}: UNet transformer depth differs between levels {sorted(depths)}; "
            f"only SD 1.x / 2.x UNets (depth 1) are supported"
        )
    proj_in = [k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    heads = SD1_UNET_HEADS if kind == "sd1" else [max(1, c // SD2_UNET_HEAD_WIDTH) for c in channels]
    inferred = {
        "in_channels": conv_in[1],
        "out_channels": _shape(shapes, UNET_PREFIX + "out.2.weight", source)[0],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "cross_attention_dim": _cross_attention_dim(shapes, source),
        "transformer_layers_per_block": depths.pop() if depths else 1,
        "use_linear_projection": bool(proj_in) and len(shapes[proj_in[0]]) == 2,
        "attention_head_dim": heads,
    }
    if kind.startswith("sdxl"):
        inferred["transformer_layers_per_block"] = _sdxl_depths(shapes, down_types, per_level, source)
        inferred["projection_class_embeddings_input_dim"] = _shape(shapes, SDXL_ADD_EMBEDDING, source)[1]
    return inferred


def _sdxl_depths(shapes: Mapping[str, tuple], down_types: list[str], per_level: int, source: str) -> int | list[int]:
    """Transformer blocks per level (SDXL: 1, 2, 10 with none at level 0; the refiner: 4 at each attention
    level). diffusers' mid block runs the last entry's depth, so levels without attention take the mid
    block's depth; one depth everywhere is given as an int, as the refiner's config does."""
    p = re.escape(UNET_PREFIX)
    mid = len(_indices(shapes, p + r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    depths = []
    for level, kind in enumerate(down_types):
        first = 1 + level * (per_level + 1)
        attention = p + rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."
        depths.append(len(_indices(shapes, attention)) if kind == "CrossAttnDownBlock2D" else mid)
    if depths[-1] != mid:
        raise ValueError(
            f"{source}: the UNet mid block has {mid} transformer blocks but the last level has "
            f"{depths[-1]}; diffusers' UNet gives both the same depth"
        )
    return depths[0] if len(set(depths)) == 1 else depths


def _infer_vae(shapes: Mapping[str, tuple], source: str) -> dict:
    p = re.escape(VAE_PREFIX)
    levels = _indices(shapes, p + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError(f"{source}: no VAE in the checkpoint (no key under {VAE_PREFIX + 'encoder.down.'!r})")
    channels = [_shape(shapes, f"{VAE_PREFIX}encoder.down.{i}.block.0.conv2.weight", source)[0] for i in levels]
    return {
        "in_channels": _shape(shapes, VAE_PREFIX + "encoder.conv_in.weight", source)[1],
        "out_channels": _shape(shapes, VAE_PREFIX + "decoder.conv_out.weight", source)[0],
        "latent_channels": _shape(shapes, VAE_PREFIX + "decoder.conv_in.weight", source)[1],
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, p + r"encoder\.down\.0\.block\.(\d+)\.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


def _infer_text(shapes: Mapping[str, tuple], layout: Layout, source: str) -> dict:
    if layout.kind == "sd1":
        return _infer_hf_text(shapes, layout.text_prefix, source)
    # SD 2.x conditions on the penultimate block: the last one is in the file but never run.
    return _infer_open_clip_text(shapes, layout.text_prefix, source, all_layers=False)


def _infer_hf_text(shapes: Mapping[str, tuple], prefix: str, source: str) -> dict:
    vocab, hidden = _shape(shapes, prefix + "embeddings.token_embedding.weight", source)
    positions = _shape(shapes, prefix + "embeddings.position_embedding.weight", source)[0]
    layers = len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
    inner = _shape(shapes, prefix + "encoder.layers.0.mlp.fc1.weight", source)[0]
    return _text_sizes(vocab, hidden, positions, layers, inner)


def _infer_open_clip_text(shapes: Mapping[str, tuple], prefix: str, source: str, all_layers: bool) -> dict:
    """OpenCLIP tower sizes; all_layers=False drops the last block (SD 2.x never runs it), True keeps it
    and reads the projection width (SDXL pools the last block's output through text_projection)."""
    vocab, hidden = _shape(shapes, prefix + "token_embedding.weight", source)
    positions = _shape(shapes, prefix + "positional_embedding", source)[0]
    layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    inner = _shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight", source)[0]
    sizes = _text_sizes(vocab, hidden, positions, layers if all_layers else layers - 1, inner)
    if all_layers:
        sizes["projection_dim"] = _shape(shapes, prefix + "text_projection", source)[1]
    return sizes


def _text_sizes(vocab: int, hidden: int, positions: int, layers: int, inner: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": positions,
        "num_hidden_layers": layers,
        "intermediate_size": inner,
        "num_attention_heads": max(1, hidden // TEXT_HEAD_WIDTH),
    }


def is_unused_original_key(key: str, layout: Layout, text_layers: int) -> bool:
    """Keys under the network prefixes that SD inference does not use (so they are not 'unexpected')."""
    if key.startswith(VAE_PREFIX + "loss."):
        return True  # the VAE's training loss (LPIPS / discriminator), kept by some training checkpoints
    if layout.kind.startswith("sdxl"):
        if layout.text_prefix is not None and key == layout.text_prefix + "embeddings.position_ids":
            return True
        return layout.text_prefix_2 is not None and key in (
            layout.text_prefix_2 + "logit_scale",
            layout.text_prefix_2 + "attn_mask",
        )
    if layout.text_prefix is None or not key.startswith(layout.text_prefix):
        return False
    rest = key[len(layout.text_prefix) :]
    if layout.kind == "sd1":
        return rest == "embeddings.position_ids"
    return rest in ("text_projection", "logit_scale", "attn_mask") or rest.startswith(
        f"transformer.resblocks.{text_layers}."
    )


# ----------------------------------------------------------------------------- diffusers -> original


def to_original_layout(
    *,
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    kind: str,
) -> dict[str, torch.Tensor]:
    """diffusers / transformers state dicts -> one original-layout (CompVis) state dict.

    `kind` picks the text-encoder layout: "sd1" (HF CLIP under cond_stage_model.transformer.) or
    "sd2" (OpenCLIP under cond_stage_model.model., q/k/v fused). OpenCLIP's last block, which SD 2.x
    never runs, is written as zeros so the file has the block count SD 2.x checkpoints have.
    """
    if kind not in ("sd1", "sd2"):
        raise ValueError(f"unknown model kind {kind!r}; expected 'sd1' or 'sd2'")
    out: dict[str, torch.Tensor] = {}
    for key, where in unet_key_map(unet).items():
        out[UNET_PREFIX + where.key] = unet[key]
    for key, where in vae_key_map(vae).items():
        tensor = vae[key]
        out[VAE_PREFIX + where.key] = tensor[:, :, None, None] if where.op == "to_linear" else tensor
    text_prefix = SD1_TEXT_PREFIX if kind == "sd1" else SD2_TEXT_PREFIX
    fused: dict[str, list] = {}
    for key, where in text_key_map(text_encoder, kind).items():
        if where.op == "qkv":
            fused.setdefault(where.key, [None] * 3)[where.part] = text_encoder[key]
        else:
            out[text_prefix + where.key] = text_encoder[key]
    for key, parts in fused.items():
        out[text_prefix + key] = torch.cat(parts, dim=0)
    if kind == "sd2":
        layers = len(_indices(out, re.escape(text_prefix) + r"transformer\.resblocks\.(\d+)\."))
        last = f"{text_prefix}transformer.resblocks.{layers - 1}."
        for key in [k for k in out if k.startswith(last)]:
            out[f"{text_prefix}transformer.resblocks.{layers}." + key[len(last) :]] = torch.zeros_like(out[key])
    return {k: v.contiguous() for k, v in out.items()}
