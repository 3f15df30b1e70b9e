"""LoRA swap timings for runtime.bench (`--lora PATH` or `--lora-rank R`): the `lora_swaps` section.

For each torch / triton row, after the timed rounds: `SWAP_REPEATS` times load + apply (`load_lora`:
read the file, check it, write base + delta into the weights), re-scale (`set_lora_scale`) and unload
(`unload_lora`, the base copied back), each timed alone with the device drained; then the step time
with the LoRA applied, paired with an image without it right before (the same moment, the same row),
and the CPU memory the exact base copies hold. Exported backends (onnxruntime, tensorrt) are listed as
skipped: their weights live in the exported graphs (issue 13's refit / update work).

`--lora-rank R` writes a random LoRA (diffusers / peft names) on every linear layer of the UNet's
attention blocks and of the text encoder(s), the shape of kohya's default LoRA. Each layer's delta has
an RMS of `DELTA_RELATIVE` times its weight's, so the fp16 activations stay in range as with a trained one.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time

import torch

from runtime.bench.measure import _generate, _sync
from runtime.bench.rounds import spread

LORA_BACKENDS = ("torch", "triton")
SWAP_REPEATS = 5
SWAP_NAME = "bench-lora"
DELTA_RELATIVE = 0.05
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def random_lora(pipe, rank: int, path, seed: int = 0) -> pathlib.Path:
    """Write a random rank-`rank` LoRA for `pipe`'s UNet attention blocks and text encoder(s) to `path`."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    networks = {"unet": pipe.unet, **{name: getattr(pipe.components, name, None) for name in _TEXT_ENCODERS}}
    tensors = {}
    for component, network in networks.items():
        if not isinstance(network, torch.nn.Module):
            continue
        for key, weight in network.state_dict().items():
            if not key.endswith(".weight") or weight.ndim != 2 or (component == "unet" and "attentions" not in key):
                continue
            if component != "unet" and not (".self_attn." in key or ".mlp." in key):
                continue
            out_features, in_features = weight.shape
            rms = weight.float().pow(2).mean().sqrt().item()
            down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
            up = torch.randn(out_features, rank, generator=generator) * DELTA_RELATIVE * rms / math.sqrt(rank)
            layer = f"{component}.{key[: -len('.weight')]}"
            tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"] = down, up
    path = pathlib.Path(path)
    save_file(tensors, str(path))
    return path


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _step_intervals(pipe, config) -> list[float]:
    """The step intervals (ms) of one bench image (as runtime.bench.measure.run_round takes them)."""
    stamps: list[float] = []

    def on_step(*_):
        _sync(config.device)
        stamps.append(time.perf_counter())

    _generate(pipe, config, on_step)
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def measure_swaps(row, config, path, repeats: int = SWAP_REPEATS) -> dict:
    """The `lora_swaps` entry of one row (runtime.bench.measure.Row)."""
    entry = {"backend": row.backend, "label": row.label, "lora": str(path)}
    if row.backend not in LORA_BACKENDS:
        return {**entry, "skipped": f"LoRA swaps are measured on {', '.join(LORA_BACKENDS)} rows"}
    if row.error is not None:
        return {**entry, "skipped": f"the row failed: {row.error}"}
    pipe = row.pipe
    load, rescale, unload = [], [], []
    try:
        for index in range(repeats):
            load.append(_timed(lambda: pipe.load_lora(path, scale=1.0, name=SWAP_NAME), config.device))
            scale = 0.5 if index % 2 else 0.8
            rescale.append(_timed(functools.partial(pipe.set_lora_scale, SWAP_NAME, scale), config.device))
            unload.append(_timed(lambda: pipe.unload_lora(SWAP_NAME), config.device))
        without = _step_intervals(pipe, config)
        pipe.load_lora(path, scale=1.0, name=SWAP_NAME)
        base_bytes, touched = pipe._loras.base_bytes, pipe._loras.touched_weights
        try:
            with_lora = _step_intervals(pipe, config)
        finally:
            pipe.unload_lora(SWAP_NAME)
    except Exception as err:  # noqa: BLE001 -- the entry says what broke; the table is still printed
        if SWAP_NAME in pipe.loras:
            pipe.unload_lora(SWAP_NAME)
        return {**entry, "error": f"{type(err).__name__}: {err}"}
    step_with, step_without = spread(with_lora), spread(without)
    return {
        **entry,
        "load_apply_ms": spread(load),
        "rescale_ms": spread(rescale),
        "unload_ms": spread(unload),
        "unet_step_ms_with_lora": step_with,
        "unet_step_ms_without": step_without,
        "step_ratio_with_to_without": step_with["median"] / step_without["median"],
        "touched_weights": touched,
        "base_copy_mb": base_bytes / 2**20,
    }


def format_swaps(entries: list[dict]) -> str:
    lines = ["LoRA swaps (ms, median of each; step times paired with an image without the LoRA):"]
    for e in entries:
        if "skipped" in e or "error" in e:
            lines.append(f"  {e['label']:<20} {e.get('skipped') or 'failed: ' + e['error']}")
            continue
        lines.append(
            f"  {e['label']:<20} load+apply {e['load_apply_ms']['median']:.2f}, re-scale "
            f"{e['rescale_ms']['median']:.2f}, unload {e['unload_ms']['median']:.2f}; step "
            f"{e['unet_step_ms_with_lora']['median']:.2f} with / {e['unet_step_ms_without']['median']:.2f} "
            f"without; {e['touched_weights']} weights, base copy {e['base_copy_mb']:.1f} MB"
        )
    return "\n".join(lines)
