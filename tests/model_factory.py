"""Small random-weight Stable Diffusion models on disk, for tests.

Built with diffusers / transformers themselves (the reference implementations), with every
parameter perturbed away from its default init (norms at identity and zero biases hide bugs),
then written the way real checkpoints are written:

    small_configs(kind)                      -> {"unet", "vae", "text_encoder", "scheduler", "tokenizer"} dicts
    build_reference_models(kind, seed=0)     -> {"unet", "vae", "text_encoder"}: diffusers/transformers modules
    reference_state_dict(kind, network, seed=0) -> the state dict of one of them (shared, read-only)
    save_diffusers_folder(path, kind, ...)   -> a diffusers pipeline folder (model_index.json, unet/, vae/,
                                                text_encoder/, tokenizer/, scheduler/), safetensors
    save_single_file(path, kind, ...)        -> an original-layout (CompVis / A1111) .safetensors checkpoint
    full_size_meta_models(kind)              -> the reference models at the real SD 1.5 / 2.1 size, on the
                                                meta device (shapes only: for key / shape checks at full size)

kind is "sd1" (conv proj_in, 8 UNet heads, quick_gelu CLIP, PNDM / epsilon, pad <|endoftext|>) or
"sd2" (linear proj_in, 64-wide UNet heads, gelu OpenCLIP-style encoder, Euler / v_prediction, pad "!").
The same (kind, seed) always gives the same weights, so a folder and a single file saved with the
same seed hold identical tensors. Sizes keep SD's fixed constants (32 norm groups, 64-wide text
heads, 8x VAE factor, 77 tokens, the real 49408-token vocabulary) so that the single-file loader,
which reads sizes from tensor shapes, understands these files exactly as it does real ones.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from runtime.bench import presets
from tests.tokenizer_fixtures import write_sd_tokenizer_folder

KINDS = ("sd1", "sd2")

_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "projection_dim": 64,
}
_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "norm_num_groups": 32,
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
    "scaling_factor": 0.18215,
}
_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}

_CONFIGS = {
    "sd1": {
        "unet": {**_UNET, "block_out_channels": [32, 64], "attention_head_dim": 8, "use_linear_projection": False},
        "vae": _VAE,
        "text_encoder": {**_TEXT, "hidden_act": "quick_gelu"},
        "scheduler": {
            **_SCHEDULE,
            "_class_name": "PNDMScheduler",
            "prediction_type": "epsilon",
            "skip_prk_steps": True,
            "set_alpha_to_one": False,
        },
        "tokenizer": {"pad_token": "<|endoftext|>"},
    },
    "sd2": {
        # SD 2.x heads are 64 wide: 64 and 128 channels -> 1 and 2 heads.
        "unet": {**_UNET, "block_out_channels": [64, 128], "attention_head_dim": [1, 2], "use_linear_projection": True},
        "vae": _VAE,
        "text_encoder": {**_TEXT, "hidden_act": "gelu"},
        "scheduler": {**_SCHEDULE, "_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"},
        "tokenizer": {"pad_token": "!"},
    },
}


def small_configs(kind: str) -> dict[str, dict]:
    """Fresh copies of the small configs of `kind` ("sd1" | "sd2"), diffusers / transformers style."""
    if kind not in _CONFIGS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return copy.deepcopy(_CONFIGS[kind])


def perturb_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Move every parameter away from its init (runtime.bench.presets.perturb_): norms off identity, biases off
    zero, weights jittered by half their own RMS."""
    return presets.perturb_(module, generator, relative=0.5, absolute=0.1)


def build_reference_models(kind: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """{"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": transformers CLIPTextModel},
    fp32, eval mode, perturbed; deterministic in (kind, seed); the global RNG is left untouched.
    Returns fresh copies: callers may modify them."""
    return copy.deepcopy(_cached_reference_models(kind, seed))


def reference_state_dict(kind: str, network: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of one network ("unet" | "vae" | "text_encoder") of build_reference_models(kind, seed),
    without copying: read it, do not modify it."""
    return _cached_reference_models(kind, seed)[network].state_dict()


@functools.lru_cache(maxsize=4)
def _cached_reference_models(kind: str, seed: int) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = small_configs(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    generator = torch.Generator().manual_seed(seed + 1)
    for name in ("unet", "vae", "text_encoder"):
        perturb_(models[name], generator).eval()
    return models


def _scheduler(kind: str):
    import diffusers

    config = small_configs(kind)["scheduler"]
    cls = getattr(diffusers, config.pop("_class_name"))
    return cls(**config)


@functools.lru_cache(maxsize=2)
def _tokenizer_files(pad_token: str) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_sd_tokenizer_folder(Path(scratch), pad_token)
        return {file.name: file.read_bytes() for file in folder.iterdir()}


def _write_tokenizer_folder(folder: Path, pad_token: str) -> None:
    """tests/tokenizer_fixtures.write_sd_tokenizer_folder, built once per pad token and then copied."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _tokenizer_files(pad_token).items():
        (folder / name).write_bytes(data)


def save_diffusers_folder(
    path,
    kind: str = "sd1",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    shards: bool = False,
    seed: int = 0,
) -> Path:
    """Write a diffusers StableDiffusionPipeline folder at `path` and return it.

    dtype: dtype of the stored weights. variant: e.g. "fp16" names the weight files
    `diffusion_pytorch_model.fp16.safetensors` / `model.fp16.safetensors` (call twice on one path,
    with and without a variant, to get both sets side by side). shards: split every model into
    several files plus a `*.safetensors.index[.variant].json`, as large checkpoints are stored.
    """
    path = Path(path)
    # The cached models are only read (and cast copies written) unless another dtype is asked for.
    models = _cached_reference_models(kind, seed)
    if dtype != torch.float32:
        models = {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}
    shard_size = "2MB" if shards else "10GB"
    for name, model in models.items():
        # Via a scratch folder: save_pretrained deletes weight files of other variants it finds.
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(scratch, variant=variant, max_shard_size=shard_size)
            (path / name).mkdir(parents=True, exist_ok=True)
            for file in Path(scratch).iterdir():
                shutil.copy(file, path / name / file.name)
    _scheduler(kind).save_pretrained(path / "scheduler")
    _write_tokenizer_folder(path / "tokenizer", small_configs(kind)["tokenizer"]["pad_token"])
    import diffusers

    scheduler_class = small_configs(kind)["scheduler"]["_class_name"]
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path


def single_file_state_dict(kind: str = "sd1", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """The original-layout (CompVis) state dict of the models `build_reference_models(kind, seed)` builds."""
    from runtime.single_file import to_original_layout

    models = _cached_reference_models(kind, seed)
    state = {name: {k: v.to(dtype) for k, v in model.state_dict().items()} for name, model in models.items()}
    return to_original_layout(unet=state["unet"], vae=state["vae"], text_encoder=state["text_encoder"], kind=kind)


def save_single_file(path, kind: str = "sd1", dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write an original-layout single-file checkpoint (`path`, a .safetensors file) and return it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(single_file_state_dict(kind, dtype, seed), str(path))
    return path


def full_size_meta_models(kind: str) -> dict[str, torch.nn.Module]:
    """diffusers / transformers models at the real SD 1.5 ("sd1") / SD 2.1 ("sd2") size on the meta
    device: every parameter has its real shape and no storage."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from runtime.default_configs import default_configs

    configs = default_configs(kind)
    unet, vae = ({k: v for k, v in configs[n].items() if not k.startswith("_")} for n in ("unet", "vae"))
    text = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**unet),
            "vae": AutoencoderKL(**vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**text)),
        }
