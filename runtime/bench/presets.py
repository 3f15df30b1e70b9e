"""Model architectures the benchmark can build with random weights when no checkpoint is given.

`sd15` is the real Stable Diffusion 1.5 architecture (859.5M-parameter UNet), `sd21` SD 2.1's (768-v: linear
projections, 64-wide heads, the 23-layer OpenCLIP ViT-H text encoder); `tiny` keeps the SD 1.x
shape of every network (conv projections, quick_gelu text encoder, 8x VAE, PNDM schedule) but small
enough that a CPU runs a guided image in a second or two. `sdxl` is the SDXL base architecture (2.57B-parameter
UNet, CLIP-L + OpenCLIP bigG) and `tiny-sdxl` its CPU-sized shape; both come from
runtime/default_configs.py's SDXL_BENCH_PRESETS, which also gives their run settings (1024², guided, 30
steps for `sdxl`): `preset_run`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from runtime import default_configs

_TINY = {
    "unet": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [16, 32, 32, 32],
        "norm_num_groups": 8,
        "sample_size": 64,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
}

# preset -> the default_configs kind (also the Components.kind of its random model) whose full-size
# configs it starts from
_KINDS = {"tiny": "sd1", "sd15": "sd1", "sd21": "sd2", "tiny-sdxl": "sdxl", "sdxl": "sdxl"}
PRESETS = tuple(_KINDS)


def preset_kind(name: str) -> str:
    """ "sd1" | "sd2" | "sdxl": the model family of preset `name`."""
    preset_configs(name)  # the unknown-preset error
    return _KINDS[name]


def preset_networks(name: str) -> tuple[str, ...]:
    """The networks preset `name` has: NETWORKS, less text_encoder_2 outside SDXL."""
    return NETWORKS if preset_kind(name) == "sdxl" else NETWORKS[:3]


def preset_run(name: str) -> dict | None:
    """{width, height, steps, guidance} an SDXL preset runs at by default; None for the SD 1/2 presets
    (the bench's device defaults apply)."""
    if name in default_configs.SDXL_BENCH_PRESETS:
        return default_configs.sdxl_bench_preset(name)[1]
    preset_configs(name)
    return None


def preset_configs(name: str) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} config dicts (diffusers / transformers form); SDXL
    presets also "text_encoder_2", "tokenizer", "tokenizer_2" and "pipeline" (model_index.json's flags)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    if name in default_configs.SDXL_BENCH_PRESETS:
        return default_configs.sdxl_bench_preset(name)[0]
    full = default_configs.default_configs(_KINDS[name])
    configs = {key: full[key] for key in ("unet", "vae", "text_encoder", "scheduler")}
    if name == "tiny":
        for key, overrides in _TINY.items():
            configs[key] = {**configs[key], **copy.deepcopy(overrides)}
    return configs


def perturb_(
    module: torch.nn.Module, generator: torch.Generator, relative: float = 0.1, absolute: float = 0.1
) -> torch.nn.Module:
    """Move every parameter of `module` off its default init, in place, deterministically from
    `generator`; returns `module`.

    Matrices, conv kernels and embeddings (2+ dims) get noise of `relative` times their own RMS: they
    keep their init's scale, so activations keep the size a trained network has and fp16 keeps its
    headroom at the full SD architectures (noise of a fixed size is 5-10x a conv's init scale there, and
    the UNet overflows fp16). Vectors (norm weights at 1, biases often at 0) get noise of `absolute`,
    so that a swapped, missing or misread norm or bias changes the output.
    """
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32, device=generator.device)
            scale = absolute
            if param.dim() > 1:
                rms = param.detach().float().pow(2).mean().sqrt().item()
                scale = relative * rms if rms > 0 else absolute
            param.add_(noise.mul_(scale).to(param.device, param.dtype))
    return module


NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL only
_WEIGHTS_FILE = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
# Seed streams per network: seed * _STREAMS + offset. Kept at 3, what it was before text_encoder_2, so the
# SD presets' weights for every seed stay as they were; text_encoder_2 takes a stream of its own far above.
_STREAMS = 3
_TEXT_2_STREAM = 1 << 40


def random_network(preset: str, name: str, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """One network ("unet" | "vae" | "text_encoder" | SDXL's "text_encoder_2") of `preset` with seeded
    random fp32 weights, built directly on `device` (no disk round trip), perturbed off its init;
    deterministic in (preset, name, seed, device type). The global RNG is left as it was."""
    from runtime.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from runtime.models.unet import UNet, UNetConfig
    from runtime.models.vae import AutoencoderKL, VAEConfig

    if name not in preset_networks(preset):
        raise ValueError(f"preset {preset!r} has no network {name!r}; choose one of {preset_networks(preset)}")
    config = preset_configs(preset)[name]
    build = {
        "unet": lambda: UNet(UNetConfig.from_dict(config)),
        "vae": lambda: AutoencoderKL(VAEConfig.from_dict(config)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_dict(config)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config)),
    }[name]
    # Each network its own stream: building one alone gives the same weights.
    stream = seed * _STREAMS + (_TEXT_2_STREAM if name == "text_encoder_2" else NETWORKS.index(name))
    stream %= 1 << 64  # torch seeds are 64-bit; make-model takes seeds up to 2**63
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(stream)
        with device:
            model = build()
    perturb_(model, torch.Generator(device).manual_seed(stream))
    return model.eval()


def write_random_model(preset: str, folder: str | Path, seed: int = 0, weights: bool = True) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL
    presets also text_encoder_2/ and tokenizer_2/, padding with "!") holding the `preset` architecture with
    seeded random fp32 weights; return the folder. weights=False writes everything but the weight files (the
    benchmark then builds the networks in memory with random_network: no multi-GB round trip through the disk).

    The benchmark loads it back through runtime.weights like any real checkpoint, and the exported
    backends and diffusers' baseline read the same files. The tokenizer is the real CLIP vocabulary,
    derived from the BPE file open_clip ships.
    """
    from safetensors.torch import save_file

    from runtime.tokenizer import EOS_TOKEN

    folder = Path(folder)
    configs = preset_configs(preset)
    sdxl = preset_kind(preset) == "sdxl"
    for name in preset_networks(preset):
        (folder / name).mkdir(parents=True, exist_ok=True)
        _write_json(folder / name / "config.json", configs[name])
        if not weights:
            continue
        model = random_network(preset, name, seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / name / _WEIGHTS_FILE[name]))
        del model  # one full-size network in memory at a time
    (folder / "scheduler").mkdir(exist_ok=True)
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    vocab, merges = _clip_vocabulary()
    tokenizers = {"tokenizer": EOS_TOKEN} | ({"tokenizer_2": configs["tokenizer_2"]["pad_token"]} if sdxl else {})
    for name, pad_token in tokenizers.items():
        (folder / name).mkdir(exist_ok=True)
        _write_json(folder / name / "vocab.json", vocab)
        (folder / name / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        _write_json(
            folder / name / "special_tokens_map.json",
            {"bos_token": "<|startoftext|>", "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN},
        )
        _write_json(folder / name / "tokenizer_config.json", {"model_max_length": 77})
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        for key in ("feature_extractor", "requires_safety_checker", "safety_checker"):
            del index[key]
        index |= {
            "_class_name": "StableDiffusionXLPipeline",
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": configs["pipeline"]["force_zeros_for_empty_prompt"],
        }
    _write_json(folder / "model_index.json", index)
    return folder


def _clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP vocabulary from the BPE file open_clip ships; where open_clip is not installed
    (the bare GPU machine), a byte-level vocabulary without merges. Random weights make any
    vocabulary equally meaningful: prompts then tokenize to characters, the same for every backend."""
    from runtime.tokenizer import BOS_TOKEN, EOS_TOKEN, byte_level_alphabet, open_clip_vocab_and_merges

    try:
        return open_clip_vocab_and_merges()
    except FileNotFoundError:
        tokens = byte_level_alphabet() + [BOS_TOKEN, EOS_TOKEN]
        return {token: i for i, token in enumerate(tokens)}, []


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
