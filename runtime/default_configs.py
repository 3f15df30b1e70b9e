"""The Stable Diffusion 1.x / 2.x / XL configs a single-file checkpoint does not carry.

An original-layout (CompVis / A1111) checkpoint holds tensors only. Sizes (channels, layer
counts, vocabulary) are read from the tensor shapes by runtime/single_file.py; everything
here is what shapes cannot tell: head counts, activations, norm groups, the noise schedule,
the default resolution and the tokenizer's pad token. Values are those of the reference
diffusers repositories: stable-diffusion-v1-5 (SD 1.x), stabilityai/stable-diffusion-2-1
(SD 2.x, 768-v), stabilityai/stable-diffusion-xl-base-1.0 ("sdxl") and
stable-diffusion-xl-refiner-1.0 ("sdxl-refiner"). Every call returns fresh dicts, so callers may edit them.
"""

from __future__ import annotations

import copy

KINDS = ("sd1", "sd2", "sdxl", "sdxl-refiner")

# Head counts are not visible in weight shapes. SD 1.x uses 8 heads at every UNet level; SD 2.x
# uses 64-wide heads (the diffusers config calls the head COUNT `attention_head_dim`, a
# historical misnomer). Both text encoders (CLIP ViT-L/14 and OpenCLIP ViT-H/14) use 64-wide heads.
SD1_UNET_HEADS = 8
SD2_UNET_HEAD_WIDTH = 64
TEXT_HEAD_WIDTH = 64
# GroupNorm group count of every SD UNet and VAE.
NORM_GROUPS = 32
# SDXL: the width of each sinusoid of `time_ids` (original size, crop, target size / aesthetic score),
# not visible in shapes (add_embedding sees only 6 x this, or 5 x for the refiner).
SDXL_TIME_EMBED_DIM = 256
SDXL_TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}  # (h, w, top, left, h, w) / (h, w, top, left, aesthetic score)

_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": NORM_GROUPS,
    "block_out_channels": [320, 640, 1280, 1280],
    "transformer_layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": NORM_GROUPS,
    "scaling_factor": 0.18215,
}

_TEXT_COMMON = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_SCHEDULER_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
}

_DEFAULTS = {
    "sd1": {
        "unet": {
            **_UNET_COMMON,
            "sample_size": 64,
            "cross_attention_dim": 768,
            "attention_head_dim": SD1_UNET_HEADS,
            "use_linear_projection": False,
            "upcast_attention": False,
        },
        "vae": {**_VAE, "sample_size": 512},
        "text_encoder": {
            **_TEXT_COMMON,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
        },
        "scheduler": {**_SCHEDULER_COMMON, "_class_name": "PNDMScheduler", "prediction_type": "epsilon"},
        "tokenizer": {"pad_token": "<|endoftext|>", "model_max_length": 77},
    },
    "sd2": {
        "unet": {
            **_UNET_COMMON,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {**_VAE, "sample_size": 768},
        # 23 layers: SD 2.x conditions on the penultimate of OpenCLIP ViT-H's 24 blocks.
        "text_encoder": {
            **_TEXT_COMMON,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "hidden_act": "gelu",
        },
        # SD 2.x (768-v) predicts v; the 512 "base" model predicts epsilon: pass prediction_type then.
        "scheduler": {**_SCHEDULER_COMMON, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
        "tokenizer": {"pad_token": "!", "model_max_length": 77},
    },
}


_SDXL_UNET = {
    **_UNET_COMMON,
    "sample_size": 128,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "use_linear_projection": True,
    "upcast_attention": False,
}
_SDXL_VAE = {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# OpenCLIP ViT-bigG/14 as transformers' CLIPTextModelWithProjection; all 32 blocks run (pooling reads
# the last), SDXL conditions on the penultimate.
_SDXL_TEXT_2 = {
    **_TEXT_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_SDXL_SCHEDULER = {
    **_SCHEDULER_COMMON,
    "_class_name": "EulerDiscreteScheduler",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

_DEFAULTS["sdxl"] = {
    "unet": {
        **_SDXL_UNET,
        "block_out_channels": [320, 640, 1280],
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "projection_class_embeddings_input_dim": 1280 + 6 * SDXL_TIME_EMBED_DIM,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "vae": _SDXL_VAE,
    "text_encoder": {
        **_TEXT_COMMON,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "text_encoder_2": _SDXL_TEXT_2,
    "scheduler": _SDXL_SCHEDULER,
    "tokenizer": {"pad_token": "<|endoftext|>", "model_max_length": 77},
    "tokenizer_2": {"pad_token": "!", "model_max_length": 77},
    "pipeline": {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
}
_DEFAULTS["sdxl-refiner"] = {
    "unet": {
        **_SDXL_UNET,
        "block_out_channels": [384, 768, 1536, 1536],
        "attention_head_dim": [6, 12, 24, 24],
        "transformer_layers_per_block": 4,
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 1280 + 5 * SDXL_TIME_EMBED_DIM,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "vae": _SDXL_VAE,
    "text_encoder_2": _SDXL_TEXT_2,
    "scheduler": _SDXL_SCHEDULER,
    "tokenizer_2": {"pad_token": "!", "model_max_length": 77},
    "pipeline": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
}


def default_configs(kind: str) -> dict[str, dict]:
    """Component name -> config dict for `kind` ("sd1" | "sd2" | "sdxl" | "sdxl-refiner"): "unet", "vae",
    "scheduler", the text encoders and tokenizers the kind has ("text_encoder"/"tokenizer" and, for SDXL,
    "text_encoder_2"/"tokenizer_2"; the refiner has only the second pair) and, for SDXL, "pipeline"
    (model_index.json's force_zeros_for_empty_prompt / requires_aesthetics_score)."""
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    return copy.deepcopy(_DEFAULTS[kind])


# Benchmark presets of the SDXL family, as config overrides on default_configs(kind) (random weights;
# the bench builds and writes the folder): "sdxl" is the real base architecture at its native 1024²,
# guided, 30 steps; "tiny-sdxl" keeps SDXL's shape (plain top level, transformer depth growing per level,
# two text encoders side by side, 64-wide heads, text_time added conditioning, 6 time ids) small enough
# for a CPU.
_TINY_SDXL_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1}
SDXL_BENCH_PRESETS = {
    "sdxl": {"kind": "sdxl", "run": {"width": 1024, "height": 1024, "steps": 30, "guidance": 5.0}, "configs": {}},
    "tiny-sdxl": {
        "kind": "sdxl",
        "run": {"width": 128, "height": 128, "steps": 4, "guidance": 5.0},
        "configs": {
            "unet": {
                "sample_size": 16,
                "block_out_channels": [32, 64, 128],
                "attention_head_dim": [1, 1, 2],
                "layers_per_block": 1,
                "transformer_layers_per_block": [1, 1, 2],
                "cross_attention_dim": 64 + 128,
                "norm_num_groups": 16,
                "projection_class_embeddings_input_dim": 128 + 6 * SDXL_TIME_EMBED_DIM,
            },
            "vae": {
                "block_out_channels": [16, 32, 32, 32],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "sample_size": 128,
            },
            "text_encoder": {**_TINY_SDXL_TEXT, "projection_dim": 64},
            "text_encoder_2": {
                **_TINY_SDXL_TEXT,
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_attention_heads": 2,
                "projection_dim": 128,
            },
        },
    },
}


def sdxl_bench_preset(name: str) -> tuple[dict[str, dict], dict]:
    """(component configs as default_configs gives them, run settings {width, height, steps, guidance})
    of SDXL bench preset `name` ("sdxl" | "tiny-sdxl")."""
    if name not in SDXL_BENCH_PRESETS:
        raise ValueError(f"unknown SDXL bench preset {name!r}; expected one of {sorted(SDXL_BENCH_PRESETS)}")
    preset = SDXL_BENCH_PRESETS[name]
    configs = default_configs(preset["kind"])
    for component, overrides in preset["configs"].items():
        configs[component] = {**configs[component], **copy.deepcopy(overrides)}
    return configs, dict(preset["run"])
