"""What runtime.bench measures for one backend, and how: wall-clock timers synchronised with the device."""
from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time

import numpy as np
import torch

from runtime.bench.models import pipeline_for
from runtime.images import psnr

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
SEED = 1234


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark request, the same for every backend."""

    preset: str                 # random-weight architecture when `model` is None: "tiny" | "sd15"
    device: str                 # "cpu" | "cuda" | "cuda:N"
    dtype: str                  # dtype of the backends under test (the reference is always fp32 torch)
    width: int
    height: int
    steps: int                  # denoising steps of each generated image
    step_iters: int             # timed UNet steps for the median / p90
    batch: int = 1              # images per prompt
    guidance: float = 7.5       # > 1: classifier-free guidance, the UNet runs on the doubled batch
    scheduler: str | None = None
    model: str | None = None    # a diffusers folder or single file; None: random weights of `preset`
    engine_dir: str | None = None  # exported backends' artifacts (ONNX, engines); reused across runs

    def describe(self) -> str:
        weights = self.model or f"random {self.preset} weights"
        return (f"{weights}, {self.width}x{self.height}, batch {self.batch}, {self.steps} steps, "
                f"guidance {self.guidance}, {self.dtype} on {self.device}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _time_ms(fn, device: str, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls, in ms, the device drained before and after each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _generate(pipe, config: BenchConfig) -> np.ndarray:
    images = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=config.steps, guidance=config.guidance,
                           width=config.width, height=config.height, seed=SEED, num_images=config.batch,
                           scheduler=config.scheduler, progress=False)
    return np.stack([np.asarray(image) for image in images])


def reference_images(master, config: BenchConfig) -> np.ndarray:
    """The fp32 eager `torch` images every backend is compared with."""
    return _generate(pipeline_for("torch", master, config.device, "fp32"), config)


def measure_backend(name: str, master, config: BenchConfig, reference: np.ndarray) -> dict:
    """One result row; a backend that fails reports its error instead of stopping the benchmark."""
    try:
        if name == "diffusers":
            from runtime.bench.baselines import diffusers_pipeline
            pipe = diffusers_pipeline(master, config)
        else:
            # Each exported backend keeps its own artifacts (their dtypes and tools differ).
            engine_dir = None if config.engine_dir is None else str(pathlib.Path(config.engine_dir) / name)
            pipe = pipeline_for(name, master, config.device, config.dtype, engine_dir=engine_dir)
        return _measure(name, pipe, config, reference)
    except Exception as err:  # noqa: BLE001 -- the row says what broke; other rows still run
        return {"backend": name, "error": f"{type(err).__name__}: {err}"}


def _measure(name: str, pipe, config: BenchConfig, reference: np.ndarray) -> dict:
    device = config.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    images = _generate(pipe, config)  # warm-up: first-call compilation, autotuning and graph capture
    end_to_end = _time_ms(lambda: _generate(pipe, config), device, repeats=3)
    step_times = _time_steps(pipe, config)

    guided = config.guidance > 1
    prompts, negatives = [PROMPT], [NEGATIVE] if guided else None
    text = _time_ms(lambda: pipe.encode_prompt(prompts, negatives, config.guidance, config.batch),
                    device, repeats=10)
    factor = pipe.vae_scale_factor
    latents = torch.randn(config.batch, pipe.vae.config.latent_channels, config.height // factor,
                          config.width // factor, generator=torch.Generator().manual_seed(SEED)).to(device, pipe.dtype)
    vae = _time_ms(lambda: pipe.decode_latents(latents), device, repeats=5)

    step_median = statistics.median(step_times)
    return {
        "backend": name,
        "unet_step_ms": {"median": step_median, "p90": float(np.percentile(step_times, 90)),
                         "samples": len(step_times)},
        "text_encode_ms": statistics.median(text),
        "vae_decode_ms": statistics.median(vae),
        "end_to_end_ms": statistics.median(end_to_end),
        "it_per_s": 1e3 / step_median,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                        if device.startswith("cuda") else None),
        "psnr_db": None if name == "torch" and config.dtype == "fp32" else psnr(images, reference),
    }


def _time_steps(pipe, config: BenchConfig) -> list[float]:
    """Per-step times (UNet on the guided batch, guidance combine, scheduler update) read from the
    pipeline's own step callback, the device drained at each, over whole generations until
    `step_iters` intervals were seen. The first interval of each run also holds set-up: dropped."""
    times: list[float] = []
    while len(times) < config.step_iters:
        stamps: list[float] = []

        def on_step(*_):
            _sync(config.device)
            stamps.append(time.perf_counter())

        _sync(config.device)
        pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=config.steps, guidance=config.guidance,
                      width=config.width, height=config.height, seed=SEED, num_images=config.batch,
                      scheduler=config.scheduler, progress=False, callback=on_step)
        times += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return times
