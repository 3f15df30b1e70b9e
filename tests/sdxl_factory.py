"""Small random-weight SDXL base and refiner models on disk, for tests (the SDXL side of model_factory).

Built with diffusers / transformers (the references), every parameter perturbed, then written as
diffusers folders (model_index.json, unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/) or as
original-layout (SGM / A1111) single files:

    small_sdxl_configs(kind)                   -> config dicts per component, kind "sdxl" | "sdxl-refiner"
    build_sdxl_reference_models(kind, seed)    -> {"unet", "vae", ["text_encoder"], "text_encoder_2"}
    save_sdxl_folder(path, kind, ...)          -> a diffusers StableDiffusionXL[Img2Img]Pipeline folder
    sdxl_single_file_state_dict(kind, seed)    -> the same tensors in the single-file layout
    save_sdxl_single_file(path, kind, ...)     -> that state dict as .safetensors

Sizes keep SDXL's constants that the single-file loader reads back from shapes or assumes: 64-wide
attention heads in the UNet and both text encoders, 32 norm groups, 256-wide time-id sinusoids,
77 tokens and the real 49408-token vocabulary. The same (kind, seed) always gives the same weights,
so a folder and a single file saved with the same seed hold identical tensors.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from tests.model_factory import _write_tokenizer_folder, perturb_

SDXL_KINDS = ("sdxl", "sdxl-refiner")
TIME_EMBED_DIM = 256  # SDXL's; the single-file loader assumes it

_TEXT = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_CLIP_L = {
    **_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
}
_BIG_G = {
    **_TEXT,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "hidden_act": "gelu",
    "projection_dim": 128,
}
_VAE = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
}

_CONFIGS = {
    "sdxl": {
        # SDXL's shape: a plain top level, then cross-attention levels of growing transformer depth.
        "unet": {
            **_UNET,
            "block_out_channels": [32, 64, 128],
            "attention_head_dim": [1, 1, 2],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 1, 2],
            "cross_attention_dim": 64 + 128,
            "projection_class_embeddings_input_dim": 128 + 6 * TIME_EMBED_DIM,
        },
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _BIG_G,
        "scheduler": _SCHEDULER,
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "pipeline": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    },
    "sdxl-refiner": {
        # The refiner's shape: plain first and last levels, one depth everywhere, encoder 2 only.
        "unet": {
            **_UNET,
            "block_out_channels": [32, 64, 64],
            "attention_head_dim": [1, 1, 1],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": 2,
            "cross_attention_dim": 128,
            "projection_class_embeddings_input_dim": 128 + 5 * TIME_EMBED_DIM,
        },
        "vae": _VAE,
        "text_encoder_2": _BIG_G,
        "scheduler": _SCHEDULER,
        "tokenizer_2": {"pad_token": "!"},
        "pipeline": {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
        },
    },
}
NETWORKS = {
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "sdxl-refiner": ("unet", "vae", "text_encoder_2"),
}


def small_sdxl_configs(kind: str) -> dict[str, dict]:
    if kind not in _CONFIGS:
        raise ValueError(f"kind must be one of {SDXL_KINDS}, got {kind!r}")
    return copy.deepcopy(_CONFIGS[kind])


def build_sdxl_reference_models(kind: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Fresh copies of the perturbed reference models of (kind, seed), fp32, eval mode."""
    return copy.deepcopy(_cached_models(kind, seed))


@functools.lru_cache(maxsize=4)
def _cached_models(kind: str, seed: int) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = small_sdxl_configs(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {"unet": UNet2DConditionModel(**configs["unet"]), "vae": AutoencoderKL(**configs["vae"])}
        if "text_encoder" in configs:
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    generator = torch.Generator().manual_seed(seed + 1)
    for model in models.values():
        perturb_(model, generator).eval()
    return models


def save_sdxl_folder(
    path,
    kind: str = "sdxl",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    shards: bool = False,
    seed: int = 0,
) -> Path:
    """A diffusers SDXL pipeline folder at `path` (the refiner's lists text_encoder / tokenizer as null)."""
    import diffusers

    path = Path(path)
    models = _cached_models(kind, seed)
    if dtype != torch.float32:
        models = {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}
    for name, model in models.items():
        with tempfile.TemporaryDirectory() as scratch:  # save_pretrained deletes other variants' files
            model.save_pretrained(scratch, variant=variant, max_shard_size="1MB" if shards else "10GB")
            (path / name).mkdir(parents=True, exist_ok=True)
            for file in Path(scratch).iterdir():
                shutil.copy(file, path / name / file.name)
    configs = small_sdxl_configs(kind)
    scheduler_config = dict(configs["scheduler"])
    getattr(diffusers, scheduler_config.pop("_class_name"))(**scheduler_config).save_pretrained(path / "scheduler")
    for name in ("tokenizer", "tokenizer_2"):
        if name in configs:
            _write_tokenizer_folder(path / name, configs[name]["pad_token"])
    pipeline = configs["pipeline"]
    model_index = {
        "_class_name": pipeline.pop("_class_name"),
        "_diffusers_version": diffusers.__version__,
        **pipeline,
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"] if "text_encoder" in configs else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if "tokenizer" in configs else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path


# ----------------------------------------------------------------------------- the single-file writer

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


def _open_clip_state_dict(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection state dict -> OpenCLIP text tower (written independently
    of runtime/single_file.py's map, so the round trip checks the loader rather than itself)."""
    out, fused = {}, {}
    for key, tensor in text.items():
        bare = key.removeprefix("text_model.")
        if bare == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()  # OpenCLIP computes x @ text_projection
        elif bare in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[bare]] = tensor
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", bare)
            layer, rest = m.group(1), m.group(2)
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv:
                fused.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = (
                    tensor
                )
                continue
            for new, old in _OPEN_CLIP_LAYER.items():
                if rest.startswith(new + "."):
                    rest = old + rest[len(new) :]
                    break
            out[f"transformer.resblocks.{layer}.{rest}"] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out["logit_scale"] = torch.tensor(4.6052)  # in real files, unused by inference
    return out


def sdxl_single_file_state_dict(kind: str = "sdxl", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """The single-file (SGM) state dict of build_sdxl_reference_models(kind, seed): UNet and VAE in the
    LDM layout (runtime.single_file's maps, checked against diffusers' converters in the tests), CLIP-L
    under conditioner.embedders.0.transformer. (base only), OpenCLIP bigG under
    conditioner.embedders.{1 | 0 for the refiner}.model."""
    from runtime.single_file import UNET_PREFIX, VAE_PREFIX, unet_key_map, vae_key_map

    models = _cached_models(kind, seed)
    state = {name: {k: v.to(dtype) for k, v in model.state_dict().items()} for name, model in models.items()}
    out = {}
    for key, where in unet_key_map(state["unet"]).items():
        out[UNET_PREFIX + where.key] = state["unet"][key]
    for key, where in vae_key_map(state["vae"]).items():
        tensor = state["vae"][key]
        out[VAE_PREFIX + where.key] = tensor[:, :, None, None] if where.op == "to_linear" else tensor
    open_clip_prefix = "conditioner.embedders.1.model." if kind == "sdxl" else "conditioner.embedders.0.model."
    if kind == "sdxl":
        for key, tensor in state["text_encoder"].items():
            out["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = tensor
        out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for key, tensor in _open_clip_state_dict(state["text_encoder_2"]).items():
        out[open_clip_prefix + key] = tensor.to(dtype) if key != "logit_scale" else tensor
    return {k: v.contiguous() for k, v in out.items()}


def save_sdxl_single_file(
    path, kind: str = "sdxl", dtype: torch.dtype = torch.float32, seed: int = 0, drop_prefix: str | None = None
) -> Path:
    """Write sdxl_single_file_state_dict(...) to `path`; drop_prefix leaves out every key under it
    (a partial file, for error tests)."""
    from safetensors.torch import save_file

    state = sdxl_single_file_state_dict(kind, dtype, seed)
    if drop_prefix is not None:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefix)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
