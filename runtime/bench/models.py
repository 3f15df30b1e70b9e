"""The models the benchmark runs: one fp32 master copy, and a pipeline per backend made from it."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from runtime import backends
from runtime.weights import Components, resolve_dtype


def available_backends(device: str) -> list[str]:
    """Every backend that can run on `device` with what is installed, plus diffusers as a baseline."""
    names = ["torch"]
    on_gpu = device.startswith("cuda")
    if importlib.util.find_spec("triton") is not None and (on_gpu or _interpreting()):
        names.append("triton")
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        # On a GPU, onnxruntime's CPU provider would be a misleading row (and take minutes).
        if not on_gpu or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            names.append("onnxruntime")
    if on_gpu and importlib.util.find_spec("tensorrt") is not None:
        names.append("tensorrt")
    if importlib.util.find_spec("diffusers") is not None:
        names.append("diffusers")
    return names


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def build_master(config, scratch: Path) -> Components:
    """fp32 components: loaded through runtime.weights (on the CPU) from config.model, or the preset
    architecture with seeded random weights built directly on config.device; the folder written under
    `scratch` then holds only configs, tokenizer and scheduler (`source`; the diffusers baseline takes
    its weights from these networks)."""
    import json

    from runtime.bench.presets import preset_configs, preset_kind, preset_networks, random_network, write_random_model
    from runtime.tokenizer import CLIPTokenizer
    from runtime.weights import load_components

    if config.model:
        return load_components(config.model, device="cpu", dtype=torch.float32)
    folder = write_random_model(config.preset, scratch / f"random-{config.preset}", weights=False)
    names = preset_networks(config.preset)
    networks = {name: random_network(config.preset, name, device=config.device) for name in names}
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sdxl = preset_kind(config.preset) == "sdxl"
    return Components(
        **networks,
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=scheduler_config,
        source=str(folder),
        kind=preset_kind(config.preset),
        tokenizer_2=CLIPTokenizer.from_folder(folder / "tokenizer_2") if sdxl else None,
        pipeline_config=dict(preset_configs(config.preset)["pipeline"]) if sdxl else {},
    )


def pipeline_for(backend: str, master: Components, device: str, dtype, engine_dir=None):
    """A Pipeline running `backend` on a private copy of the master weights in `dtype` on `device`.
    Exported backends (onnxruntime, tensorrt) keep their artifacts in `engine_dir`."""
    from runtime.pipeline import Pipeline

    dtype = resolve_dtype(dtype)
    components = copy.copy(master)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(master, name, None) is not None:
            setattr(components, name, copy.deepcopy(getattr(master, name)).to(device=device, dtype=dtype))
    options = {"engine_dir": engine_dir} if backend in backends.EXPORTED else {}
    components = backends.prepare(backend, components, **options)
    return Pipeline(components, backend=backend)
