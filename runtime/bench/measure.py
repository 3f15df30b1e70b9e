"""What runtime.bench measures, and how: every row's pipeline built (and warmed up, uncounted) before any
timing, then the timed work interleaved across rows in rounds (runtime.bench.rounds), each measured with
wall-clock timers synchronised with the device.

Per round, each row runs one guided image with a step callback (the step intervals and the image's end-to-end
time), `TEXT_REPEATS` prompt encodes and one VAE decode. Rows also record what could bias them: their wall
and CPU time, the memory they hold, and the order they ran in.
"""

from __future__ import annotations

import dataclasses
import pathlib
import resource
import shutil
import subprocess
import time

import numpy as np
import torch

from runtime.bench import baselines
from runtime.bench.modelled import beside
from runtime.bench.models import pipeline_for
from runtime.bench.rounds import round_ratios, spread
from runtime.images import psnr

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
SEED = 1234
TEXT_REPEATS = 3  # prompt encodes per row and round (each is short)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark request, the same for every backend."""

    preset: str  # random-weight architecture when `model` is None: "tiny" | "sd15"
    device: str  # "cpu" | "cuda" | "cuda:N"
    dtype: str  # dtype of the backends under test (the reference is always fp32 torch)
    width: int
    height: int
    steps: int  # denoising steps of each generated image
    step_iters: int  # timed UNet steps for the median / p90 (at least), over all rounds
    batch: int = 1  # images per prompt
    guidance: float = 7.5  # > 1: classifier-free guidance, the UNet runs on the doubled batch
    scheduler: str | None = None
    model: str | None = None  # a diffusers folder or single file; None: random weights of `preset`
    engine_dir: str | None = None  # exported backends' artifacts (ONNX, engines); reused across runs
    rounds: int | None = None  # None: enough rounds of `steps` images for `step_iters` intervals, 3 at least
    lora: str | None = None  # a LoRA file whose swaps are timed (runtime/bench/lora_swap.py)
    lora_rank: int | None = None  # or the rank of a random LoRA to time instead
    census_target: str | None = None  # the census target modelled where the device is none (runtime/bench/modelled.py)

    @property
    def round_count(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return max(3, -(-self.step_iters // (self.steps - 1)))

    def describe(self) -> str:
        weights = self.model or f"random {self.preset} weights"
        return (
            f"{weights}, {self.width}x{self.height}, batch {self.batch}, {self.steps} steps, "
            f"guidance {self.guidance}, {self.dtype} on {self.device}"
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _time_ms(fn, device: str, repeats: int = 1) -> list[float]:
    """Wall time of each of `repeats` calls, in ms, the device drained before and after each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_rss_mb() -> float:
    """The process's peak resident set so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float | None:
    """The process's resident set now, where /proc says it."""
    try:
        return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return None


def device_clocks(device: str) -> dict | None:
    """SM / memory clocks (MHz), temperature and power of the GPU, from nvidia-smi where it answers."""
    if not device.startswith("cuda") or shutil.which("nvidia-smi") is None:
        return None
    index = torch.device(device).index or 0
    fields = ("clocks.sm", "clocks.mem", "temperature.gpu", "power.draw")
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return {field: float(value) for field, value in zip(fields, out.strip().split(", "))}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _generate(pipe, config: BenchConfig, callback=None) -> np.ndarray:
    images = pipe.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=config.steps,
        guidance=config.guidance,
        width=config.width,
        height=config.height,
        seed=SEED,
        num_images=config.batch,
        scheduler=config.scheduler,
        progress=False,
        callback=callback,
    )
    return np.stack([np.asarray(image) for image in images])


def reference_images(master, config: BenchConfig) -> np.ndarray:
    """The fp32 eager `torch` images every backend is compared with (its pipeline is gone on return)."""
    return _generate(pipeline_for("torch", master, config.device, "fp32"), config)


@dataclasses.dataclass
class Row:
    """One row of the table: a backend's pipeline and everything measured of it, round by round."""

    label: str
    backend: str
    order: int  # position in the run order (rows are built and run in it)
    pipe: object = None
    error: str | None = None
    images: np.ndarray | None = None  # from the uncounted warm-up image
    latents: torch.Tensor | None = None  # what its VAE decode times
    build_s: float = 0.0
    wall_s: float = 0.0  # build, warm-up and timed work of this row
    cpu_s: float = 0.0  # process CPU time spent in them
    rss_after_build_mb: float | None = None
    first_step_s: float | None = None  # warm-up image's start to its first step: first-call compiles, capture
    warmup_image_s: float | None = None
    peak_mem_mb: float | None = None  # GPU: this row's weights and its warm-up image's peak
    step_ms: list[list[float]] = dataclasses.field(default_factory=list)  # [round] -> step intervals
    e2e_ms: list[list[float]] = dataclasses.field(default_factory=list)
    text_ms: list[list[float]] = dataclasses.field(default_factory=list)
    vae_ms: list[list[float]] = dataclasses.field(default_factory=list)

    def fail(self, err: Exception) -> None:
        self.error, self.pipe, self.latents = f"{type(err).__name__}: {err}", None, None


class _Charged:
    """Adds the wall and CPU time of a block to a row."""

    def __init__(self, row: Row):
        self.row = row

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.row.wall_s += time.perf_counter() - self.wall
        self.row.cpu_s += time.process_time() - self.cpu


def row_labels(backends: list[str]) -> list[tuple[str, str]]:
    """[(label, backend)]: the backend's name, numbered "#1", "#2"... where it appears more than once."""
    counts = {name: backends.count(name) for name in backends}
    seen: dict[str, int] = {}
    labels = []
    for name in backends:
        seen[name] = seen.get(name, 0) + 1
        labels.append((f"{name}#{seen[name]}" if counts[name] > 1 else name, name))
    return labels


def build_row(label: str, backend: str, order: int, master, config: BenchConfig) -> Row:
    """The row's pipeline, warmed up by one uncounted image (first-call compilation, autotuning, graph
    capture); a backend that fails reports its error in the row instead of stopping the benchmark."""
    row = Row(label, backend, order)
    device = config.device
    on_gpu = device.startswith("cuda")
    held_before = torch.cuda.memory_allocated(device) if on_gpu else 0
    try:
        with _Charged(row):
            start = time.perf_counter()
            if backend in baselines.ROWS:
                row.pipe = baselines.diffusers_pipeline(master, config, compiled=backend == baselines.COMPILED)
            else:
                # Each exported backend keeps its own artifacts (their dtypes and tools differ).
                engine_dir = None if config.engine_dir is None else str(pathlib.Path(config.engine_dir) / label)
                row.pipe = pipeline_for(backend, master, device, config.dtype, engine_dir=engine_dir)
            row.build_s = time.perf_counter() - start
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            stamps: list[float] = []

            def on_step(*_):
                _sync(device)
                stamps.append(time.perf_counter())

            start = time.perf_counter()
            row.images = _generate(row.pipe, config, on_step)
            _sync(device)
            # Timed apart from the steps: torch.compile compiles (and the triton backend captures) here.
            row.first_step_s, row.warmup_image_s = stamps[0] - start, time.perf_counter() - start
            if on_gpu:
                row.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - held_before) / 2**20
            factor = row.pipe.vae_scale_factor
            row.latents = torch.randn(
                config.batch,
                row.pipe.vae.config.latent_channels,
                config.height // factor,
                config.width // factor,
                generator=torch.Generator().manual_seed(SEED),
            ).to(device, row.pipe.dtype)
            row.pipe.decode_latents(row.latents)  # the decode path alone, warmed up too
        row.rss_after_build_mb = rss_mb()
    except Exception as err:  # noqa: BLE001 -- the row says what broke; other rows still run
        row.fail(err)
    return row


def run_round(row: Row, config: BenchConfig) -> None:
    """This row's share of one round: one image with its step intervals, prompt encodes, a VAE decode."""
    if row.error is not None:
        return
    device = config.device
    stamps: list[float] = []

    def on_step(*_):
        _sync(device)
        stamps.append(time.perf_counter())

    guided = config.guidance > 1
    prompts, negatives = [PROMPT], [NEGATIVE] if guided else None
    try:
        with _Charged(row):
            row.e2e_ms.append(_time_ms(lambda: _generate(row.pipe, config, on_step), device))
            # The first interval also holds the set-up before the first step: the intervals between steps.
            row.step_ms.append([(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])])
            row.text_ms.append(
                _time_ms(
                    lambda: row.pipe.encode_prompt(prompts, negatives, config.guidance, config.batch),
                    device,
                    TEXT_REPEATS,
                )
            )
            row.vae_ms.append(_time_ms(lambda: row.pipe.decode_latents(row.latents), device))
    except Exception as err:  # noqa: BLE001
        row.fail(err)


def _flat(per_round: list[list[float]]) -> list[float]:
    return [x for samples in per_round for x in samples]


def summarize(
    row: Row, rows: list[Row], config: BenchConfig, reference: np.ndarray | None, modelled: dict | None = None
) -> dict:
    """The row's result: medians and spreads, per-round ratios to the torch and both diffusers rows, PSNR,
    the census's modelled step beside the measured one (`modelled`: backend -> modelled.modelled_steps'
    entry), and what could bias it."""
    bias = {
        "order": row.order,
        "build_s": row.build_s,
        "wall_s": row.wall_s,
        "cpu_s": row.cpu_s,
        "rss_after_build_mb": row.rss_after_build_mb,
        "first_step_s": row.first_step_s,  # diffusers-compile: its compile time (holds one prompt encode)
        "warmup_image_s": row.warmup_image_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    if row.error is not None or not _flat(row.step_ms):
        return {"backend": row.backend, "label": row.label, "error": row.error or "no steps were timed", **bias}
    step = spread(_flat(row.step_ms))
    medians = {
        key: spread(_flat(getattr(row, attr)))
        for key, attr in (("text_encode_ms", "text_ms"), ("vae_decode_ms", "vae_ms"), ("end_to_end_ms", "e2e_ms"))
    }
    ratios = {}
    baselines_of = (
        ("ratio_to_torch", "torch"),
        ("ratio_to_diffusers", baselines.BASELINE),
        ("ratio_to_diffusers_compile", baselines.COMPILED),
    )
    for key, backend in baselines_of:
        baseline = next((r for r in rows if r.backend == backend and r.error is None and r.step_ms), None)
        ratios[key] = None if baseline is None else round_ratios(row.step_ms, baseline.step_ms)
        if ratios[key] is not None:
            ratios[key]["baseline"] = baseline.label
    is_reference = row.backend == "torch" and config.dtype == "fp32"
    return {
        "backend": row.backend,
        "label": row.label,
        "unet_step_ms": {"median": step["median"], "p10": step["p10"], "p90": step["p90"], "samples": step["n"]},
        **{key: value["median"] for key, value in medians.items()},
        "spread": {key: {**value, "samples": value.pop("n")} for key, value in medians.items()},
        "it_per_s": 1e3 / step["median"],
        **ratios,
        "peak_mem_mb": row.peak_mem_mb,
        "psnr_db": None if is_reference or reference is None else psnr(row.images, reference),
        "modelled_step": beside((modelled or {}).get(row.backend), step["median"]),
        **bias,
    }
