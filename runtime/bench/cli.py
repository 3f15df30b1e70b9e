"""python -m runtime.bench: speed and fidelity of every backend, side by side, on the same weights.

Each backend runs the same guided txt2img request from the same seed. Every row's pipeline is built and
warmed up (uncounted) before timing starts; the timed work then runs in rounds, one image per row per
round (A B C, A B C, ...). Rows report UNet step time (median, p10 / p90, samples), text-encode, VAE
decode and end-to-end time, it/s, peak GPU memory, PSNR of the final image against the fp32 `torch`
reference, and each step-time ratio to the torch and diffusers rows taken round by round (median and
range). `--self-check` runs one backend as two rows: their ratio shows the bench's own noise.
`--lora PATH` / `--lora-rank R` add LoRA swap timings (runtime/bench/lora_swap.py). A mistake in the
options prints one line (`error: ...`) and exits 2, before anything is built.

`python -m runtime.bench census [--models ..] [--target ..] [--json F]`: what each backend's networks cost
on a GPU, modelled on meta tensors in seconds (runtime/bench/census.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import pathlib
import re
import sys
import tempfile
import time

import torch

from runtime.backends import BACKENDS
from runtime.bench import baselines, census, lora_swap
from runtime.bench.measure import (
    BenchConfig,
    build_row,
    device_clocks,
    reference_images,
    row_labels,
    run_round,
    summarize,
)
from runtime.bench.modelled import modelled_steps
from runtime.bench.models import available_backends, build_master
from runtime.bench.presets import PRESETS, preset_run
from runtime.bench.results import write_result
from runtime.bench.rounds import round_ratios, round_robin
from runtime.dtypes import parse_dtype
from runtime.one_line_parser import EXIT_USAGE, OneLineParser
from runtime.schedulers import SCHEDULER_NAMES

EXIT_INTERRUPTED = 130
COMPILED = baselines.COMPILED


def default_config(device: str) -> BenchConfig:
    if device.startswith("cuda"):
        return BenchConfig(preset="sd15", device=device, dtype="fp16", width=512, height=512, steps=30, step_iters=50)
    # 12 rounds, not 3: on a shared CPU a burst of other work can slow one row for a whole round (per-round
    # ratios ranged 0.5-1.9 over 3 rounds on a quiet 2-core machine), so the median needs enough rounds.
    return BenchConfig(preset="tiny", device=device, dtype="fp32", width=64, height=64, steps=10, step_iters=100)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, list[str], str | None]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = default_config(device)
    p = OneLineParser(prog="python -m runtime.bench", description=__doc__)
    p.add_argument("--model", help="a diffusers folder or single-file checkpoint (default: random weights)")
    p.add_argument("--preset", default=defaults.preset, choices=PRESETS, help="random-weight architecture")
    p.add_argument("--device", default=device)
    p.add_argument("--dtype", default=defaults.dtype, help="dtype of the backends under test")
    # width / height / steps / guidance: None means the SDXL preset's own, else the device defaults.
    p.add_argument("--width", type=int, default=None, help=f"default {defaults.width} (SDXL presets: their own)")
    p.add_argument("--height", type=int, default=None, help=f"default {defaults.height} (SDXL presets: their own)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of each image")
    p.add_argument(
        "--step-iters",
        type=int,
        default=defaults.step_iters,
        help="timed UNet steps for the median / p90 (at least 20)",
    )
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--guidance", type=float, default=None, help="default 7.5 (SDXL presets: their own)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES, help="sampler (default: the checkpoint's)")
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: every one available here, plus diffusers if installed; "
        "diffusers-compile, its UNet under torch.compile, only when named)",
    )
    p.add_argument(
        "--engine-dir",
        help="where exported backends keep ONNX files / engines (default: a temporary folder, exported anew each run)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds, one image per row each (default: enough for --step-iters, 3 at least)",
    )
    p.add_argument(
        "--self-check",
        action="store_true",
        help="run one backend (--backends, default torch) as two rows and report their ratio",
    )
    p.add_argument("--json", dest="json_path", help="write the raw numbers here (rewritten after every round)")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--lora", help="also time swapping this LoRA .safetensors on the torch / triton rows")
    lora.add_argument("--lora-rank", type=int, help="also time LoRA swaps, with a random LoRA of this rank")
    p.add_argument(
        "--census-target",
        choices=sorted(census.TARGETS),
        help="the GPU whose modelled step time each row carries where the device is not one the census "
        "models (a CPU run: the ratio then says nothing of the model; runtime/bench/modelled.py)",
    )
    args = p.parse_args(argv)
    if args.preset == "sdxl" and not args.device.startswith("cuda") and not args.model:
        p.error("--preset sdxl is the full SDXL base at 1024² for GPUs; on the CPU use --preset tiny-sdxl")
    run = preset_run(args.preset) or {
        "width": defaults.width,
        "height": defaults.height,
        "steps": defaults.steps,
        "guidance": 7.5,
    }
    for name, value in run.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_values(p, args)
    if args.width <= 0 or args.height <= 0 or args.width % 8 or args.height % 8:
        p.error(f"--width and --height must be positive multiples of 8, got {args.width}x{args.height}")
    if args.steps < 2:
        p.error("--steps must be at least 2: step times are the intervals between steps")
    if args.step_iters < 20:
        p.error("--step-iters must be at least 20 for a meaningful p90")
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    config = BenchConfig(
        preset=args.preset,
        device=args.device,
        dtype=args.dtype,
        width=args.width,
        height=args.height,
        steps=args.steps,
        step_iters=args.step_iters,
        batch=args.batch,
        guidance=args.guidance,
        scheduler=args.scheduler,
        model=args.model,
        engine_dir=args.engine_dir,
        rounds=args.rounds,
        lora=args.lora,
        lora_rank=args.lora_rank,
        census_target=args.census_target,
    )
    if args.self_check:
        backends = args.backends.split(",") if args.backends else ["torch"]
        if len(backends) != 1:
            p.error(f"--self-check runs one backend twice; got --backends {args.backends}")
        backends = backends * 2
    else:
        backends = args.backends.split(",") if args.backends else available_backends(args.device)
    known = [*BACKENDS, *baselines.ROWS]
    unknown = [name for name in backends if name not in known]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return config, backends, args.json_path


def _check_values(p: argparse.ArgumentParser, args) -> None:
    """What needs no model, checked before minutes of building (each as one line, exit 2)."""
    if args.model is not None and not pathlib.Path(args.model).exists():
        p.error(f"--model path not found: {args.model}")
    try:
        parse_dtype(args.dtype)
    except ValueError as err:
        p.error(str(err))
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if not 0 <= args.guidance < math.inf:
        p.error(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.json_path is not None:
        target = pathlib.Path(args.json_path)
        if target.is_dir():
            p.error(f"--json {args.json_path} is a folder; give a file path, e.g. {target / 'bench.json'}")
        blocked = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
        if blocked is not None:
            p.error(f"--json {args.json_path}: {blocked} is a file, not a folder")
    if args.engine_dir is not None and pathlib.Path(args.engine_dir).is_file():
        p.error(f"--engine-dir {args.engine_dir} is a file, not a folder")
    if args.lora is not None and not pathlib.Path(args.lora).is_file():
        p.error(f"--lora file not found: {args.lora}")
    if args.lora_rank is not None and args.lora_rank < 1:
        p.error(f"--lora-rank must be at least 1, got {args.lora_rank}")


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'backend':<22}{'step ms (med/p10/p90)':>28}{'x torch (range)':>22}{'it/s':>8}{'text ms':>9}{'vae ms':>9}"
        f"{'e2e ms':>10}{'peak MB':>9}{'PSNR dB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:<22}  failed: {r['error']}")
            continue
        step = r["unet_step_ms"]
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        psnr = "ref" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"  # "inf": identical pixels
        lines.append(
            f"{r['label']:<22}{step['median']:>11.2f} /{step['p10']:>7.2f} /{step['p90']:>7.2f}"
            f"{_ratio_text(r['ratio_to_torch']):>22}{r['it_per_s']:>8.1f}"
            f"{r['text_encode_ms']:>9.2f}{r['vae_decode_ms']:>9.2f}{r['end_to_end_ms']:>10.1f}"
            f"{peak:>9}{psnr:>9}"
        )
    for r in rows:
        for key, name in (("ratio_to_diffusers", baselines.BASELINE), ("ratio_to_diffusers_compile", COMPILED)):
            ratio = r.get(key)
            if ratio is not None and r["backend"] != name:
                lines.append(f"{r['label']} / {name} step time: {_ratio_text(ratio)} over {ratio['rounds']} rounds")
    for r in rows:
        if r["backend"] == COMPILED and "error" not in r:
            lines.append(f"{r['label']}: torch.compile took {r['first_step_s']:.1f} s (first step, not timed above)")
        modelled = r.get("modelled_step") or {}
        if "modelled_ms" in modelled:
            note = f" ({modelled['caveat']})" if modelled["caveat"] else ""
            lines.append(
                f"{r['label']}: step {modelled['measured_ms']:.2f} ms measured, {modelled['modelled_ms']:.2f} ms "
                f"modelled for {modelled['target']}, ratio {modelled['measured_over_modelled']:.2f}{note}"
            )
    return "\n".join(lines)


def _lora_swaps(rows, config: BenchConfig, scratch: pathlib.Path) -> list[dict] | None:
    """The `lora_swaps` section, when --lora or --lora-rank asked for it (after the timed rounds)."""
    if config.lora is None and config.lora_rank is None:
        return None
    path = config.lora
    if path is None:
        donor = next((row.pipe for row in rows if row.backend in lora_swap.LORA_BACKENDS and row.error is None), None)
        if donor is None:
            return [lora_swap.measure_swaps(row, config, None) for row in rows]  # each says why it was skipped
        path = lora_swap.random_lora(donor, config.lora_rank, scratch / f"random-rank{config.lora_rank}.safetensors")
    print("timing LoRA swaps", file=sys.stderr)
    return [lora_swap.measure_swaps(row, config, path) for row in rows]


def _ratio_text(ratio: dict | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["census"]:  # the one subcommand; every other first word is the bench's own options
        return census.main(argv[1:])
    config, backends, json_path = parse_args(argv)
    try:
        return _run(config, backends, json_path)
    except KeyboardInterrupt:
        print("error: interrupted; the --json file holds the rounds that finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError, TypeError, NotImplementedError, LookupError) as err:
        # A model that does not load, a folder that cannot be written: the user's to fix, told in one line.
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return EXIT_USAGE


def _run(config: BenchConfig, backends: list[str], json_path: str | None) -> int:
    started = time.perf_counter()
    labels = row_labels(backends)
    print(
        f"runtime.bench: {config.describe()}; rows {', '.join(l for l, _ in labels)}, {config.round_count} rounds",
        file=sys.stderr,
    )
    rounds_log: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as scratch:
        if config.engine_dir is None:
            config = dataclasses.replace(config, engine_dir=str(pathlib.Path(scratch) / "engines"))
        master = build_master(config, pathlib.Path(scratch))
        # On meta tensors (seconds, no device memory), before any row is built or timed.
        modelled = modelled_steps(config, master.source, backends, config.census_target)
        # The fp32 reference: an fp32 torch row's own warm-up images, else a pipeline of its own that is
        # gone before the rows are built (no row runs beside its memory).
        reuse = config.dtype == "fp32" and "torch" in backends
        reference = None if reuse else reference_images(master, config)
        gc.collect()
        rows = []
        for order, (label, backend) in enumerate(labels):
            print(f"building {label}", file=sys.stderr)
            rows.append(build_row(label, backend, order, master, config))
        del master  # the rows hold private copies; the master's memory would weigh on every row
        gc.collect()
        if reuse:
            reference = next((r.images for r in rows if r.backend == "torch" and r.images is not None), None)

        def results() -> list[dict]:
            return [summarize(row, rows, config, reference, modelled) for row in rows]

        if json_path:  # the builds (and their failures) are kept even if no round finishes
            write_result(json_path, "runtime.bench", config.as_dict(), results(), rounds=rounds_log)
        order = round_robin([row.label for row in rows], config.round_count)
        by_label = {row.label: row for row in rows}
        for index, (round_index, label) in enumerate(order):
            if index % len(rows) == 0:
                rounds_log.append(
                    {
                        "round": round_index,
                        "order": [l for r, l in order if r == round_index],
                        "device_clocks": device_clocks(config.device),
                    }
                )
                print(f"round {round_index + 1}/{config.round_count}", file=sys.stderr)
            run_round(by_label[label], config)
            if json_path and (index + 1) % len(rows) == 0:  # a cut run keeps every finished round
                write_result(json_path, "runtime.bench", config.as_dict(), results(), rounds=rounds_log)
        table = results()
        self_check = None
        if len(rows) == 2 and rows[0].backend == rows[1].backend:
            self_check = round_ratios(rows[1].step_ms, rows[0].step_ms)
        swaps = _lora_swaps(rows, config, pathlib.Path(scratch))
    print(format_table(table))
    if swaps is not None:
        print(lora_swap.format_swaps(swaps))
    print(
        f"({time.perf_counter() - started:.1f} s in all; PSNR against fp32 torch on the same seed; "
        f"ratios are per-round medians of step time, with their range)"
    )
    if json_path:
        extra = {} if swaps is None else {"lora_swaps": swaps}
        write_result(
            json_path, "runtime.bench", config.as_dict(), table, rounds=rounds_log, self_check=self_check, **extra
        )
    if self_check is not None:
        print(
            f"self-check: {labels[1][0]} / {labels[0][0]} step time {_ratio_text(self_check)} "
            f"over {self_check['rounds']} rounds (1.0 is a fair bench)"
        )
    return 1 if any("error" in r for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
