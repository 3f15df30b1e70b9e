"""python -m runtime.bench: speed and fidelity of every backend, side by side, on the same weights.

Each backend runs the same guided txt2img request from the same seed. Rows report text-encode time,
UNet step time (median and p90 over many steps), VAE decode time, end-to-end latency, it/s, peak GPU
memory, and PSNR of the final image against the fp32 `torch` reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from runtime.backends import BACKENDS
from runtime.bench.measure import BenchConfig, measure_backend, reference_images
from runtime.bench.models import available_backends, build_master
from runtime.bench.presets import PRESETS
from runtime.bench.results import write_result
from runtime.schedulers import SCHEDULER_NAMES


def default_config(device: str) -> BenchConfig:
    if device.startswith("cuda"):
        return BenchConfig(preset="sd15", device=device, dtype="fp16", width=512, height=512,
                           steps=30, step_iters=50)
    return BenchConfig(preset="tiny", device=device, dtype="fp32", width=64, height=64,
                       steps=10, step_iters=20)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, list[str], str | None]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = default_config(device)
    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__)
    p.add_argument("--model", help="a diffusers folder or single-file checkpoint (default: random weights)")
    p.add_argument("--preset", default=defaults.preset, choices=PRESETS, help="random-weight architecture")
    p.add_argument("--device", default=device)
    p.add_argument("--dtype", default=defaults.dtype, help="dtype of the backends under test")
    p.add_argument("--width", type=int, default=defaults.width)
    p.add_argument("--height", type=int, default=defaults.height)
    p.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps of each image")
    p.add_argument("--step-iters", type=int, default=defaults.step_iters,
                   help="timed UNet steps for the median / p90 (at least 20)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                   help="sampler (default: the checkpoint's)")
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: every one available here, plus diffusers if installed)")
    p.add_argument("--engine-dir", help="where exported backends keep ONNX files / engines "
                   "(default: a temporary folder, exported anew each run)")
    p.add_argument("--json", dest="json_path", help="write the raw numbers here")
    args = p.parse_args(argv)
    if args.width <= 0 or args.height <= 0 or args.width % 8 or args.height % 8:
        p.error(f"--width and --height must be positive multiples of 8, got {args.width}x{args.height}")
    if args.steps < 2:
        p.error("--steps must be at least 2: step times are the intervals between steps")
    if args.step_iters < 20:
        p.error("--step-iters must be at least 20 for a meaningful p90")
    config = BenchConfig(preset=args.preset, device=args.device, dtype=args.dtype, width=args.width,
                         height=args.height, steps=args.steps, step_iters=args.step_iters,
                         batch=args.batch, guidance=args.guidance, scheduler=args.scheduler,
                         model=args.model, engine_dir=args.engine_dir)
    backends = args.backends.split(",") if args.backends else available_backends(args.device)
    known = [*BACKENDS, "diffusers"]
    unknown = [name for name in backends if name not in known]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return config, backends, args.json_path


def format_table(rows: list[dict]) -> str:
    head = (f"{'backend':<22}{'step ms (med/p90)':>20}{'it/s':>8}{'text ms':>9}{'vae ms':>9}"
            f"{'e2e ms':>10}{'peak MB':>9}{'PSNR dB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:<22}  failed: {r['error']}")
            continue
        step = r["unet_step_ms"]
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        psnr = "ref" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"  # "inf": identical pixels
        lines.append(f"{r['backend']:<22}{step['median']:>11.2f} /{step['p90']:>7.2f}{r['it_per_s']:>8.1f}"
                     f"{r['text_encode_ms']:>9.2f}{r['vae_decode_ms']:>9.2f}{r['end_to_end_ms']:>10.1f}"
                     f"{peak:>9}{psnr:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config, backends, json_path = parse_args(argv)
    started = time.perf_counter()
    print(f"runtime.bench: {config.describe()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as scratch:
        if config.engine_dir is None:
            config = dataclasses.replace(config, engine_dir=str(pathlib.Path(scratch) / "engines"))
        master = build_master(config, pathlib.Path(scratch))
        reference = reference_images(master, config)
        rows = [measure_backend(name, master, config, reference)
                for name in tqdm(backends, desc="backends", file=sys.stderr)]
    print(format_table(rows))
    print(f"({time.perf_counter() - started:.1f} s in all; PSNR against fp32 torch on the same seed)")
    if json_path:
        write_result(json_path, "runtime.bench", config.as_dict(), rows)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
