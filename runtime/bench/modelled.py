"""The census's modelled step time beside runtime.bench's measured one: their ratio is the model's error.

Rule: every row with timed steps gets a `modelled_step` entry. Where the census can model the row (its
backend is one the census runs, the model's component configs are in its folder) and a target is known,
the entry holds the modelled step (target, modelled_ms, launches, gb_moved, graphed), the measured median
and `measured_over_modelled`. The target is the GPU the row ran on where the census has one of its name
(H100, H200), else `--census-target`; when the row did not run on that target (a CPU run, another GPU) or
not in half precision, `caveat` says so and the ratio measures nothing about the model. Otherwise the entry
is `{"reason": ...}`, no modelled fields (also where the census itself fails: the measurement goes on).
The census models the UNet's share of a step; a measured step interval also holds the sampler's update and
the step callback's device sync (a few small launches).
"""

from __future__ import annotations

import json
import pathlib

import torch

from runtime.bench import census

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
HALF = ("fp16", "bf16", "float16", "bfloat16")


def device_target(device: str) -> str | None:
    """The census target of the GPU `device` names, or None (a CPU, a GPU the census has no figures for)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return census.target_for_device(torch.cuda.get_device_name(device))


def component_configs(source: str) -> dict | None:
    """The component configs (config.json per component) of a diffusers folder, or None for a single file."""
    folder = pathlib.Path(source)
    if not (folder / "unet" / "config.json").is_file():
        return None
    return {
        name: json.loads((folder / name / "config.json").read_text())
        for name in COMPONENTS
        if (folder / name / "config.json").is_file()
    }


def modelled_steps(config, source: str, backends: list[str], target_key: str | None) -> dict[str, dict]:
    """backend -> the modelled step entry (measured fields still absent) for each backend of the run."""
    on_device = device_target(config.device)
    target_key = on_device or target_key
    configs = component_configs(source)
    entries = {}
    for backend in dict.fromkeys(backends):
        if backend not in census.BACKENDS:
            entries[backend] = {"reason": f"the census does not model the {backend} backend"}
        elif target_key is None:
            entries[backend] = {
                "reason": f"no census target for {config.device}: it models {', '.join(census.TARGETS)} "
                "(pass --census-target to model one anyway)"
            }
        elif configs is None:
            entries[backend] = {"reason": "the census builds networks from a diffusers folder's configs"}
        else:
            target = census.TARGETS[target_key]
            request = census.Request(configs, config.width, config.height, config.batch, config.guidance > 1)
            try:
                step = census.modelled_step(request, backend, target)
            except Exception as err:  # noqa: BLE001 -- a model we cannot count must not cost the measurement
                entries[backend] = {"reason": f"the census failed: {type(err).__name__}: {err}"}
                continue
            caveats = []
            if on_device != target_key:
                caveats.append(f"measured on {config.device}, modelled for {target.name}")
            if config.dtype not in HALF:
                caveats.append(f"measured in {config.dtype}, modelled in fp16")
            entries[backend] = {
                "target": target.name,
                "modelled_ms": step["modelled_ms"],
                "launches": step["launches"],
                "gb_moved": step["gb_moved"],
                "graphed": step["graphed"],
                "caveat": "; ".join(caveats) + ": the ratio is not the model's error" if caveats else None,
            }
    return entries


def beside(entry: dict | None, measured_ms: float) -> dict | None:
    """The row's entry with its measured median and the ratio measured / modelled."""
    if entry is None or "reason" in entry:
        return entry
    return {**entry, "measured_ms": measured_ms, "measured_over_modelled": measured_ms / entry["modelled_ms"]}
