"""An independent check of runtime.bench's torch / diffusers ratio: the two UNets alone, called alternately.

    python -m benchmarks.crosscheck_ratio [--preset tiny] [--width 64 --height 64] [--calls 200]

No pipeline, no scheduler, no rounds: the guided UNet call (batch 2: unconditional and conditional) of our
`torch` backend and of diffusers' UNet2DConditionModel, on the same weights and inputs, timed call by
call in the order A B A B ..., after a warm-up of each. It prints the median of each and their ratio,
and the per-pair ratio's median and p10 / p90. runtime.bench's `torch / diffusers step time` should agree
with it within the bench's noise; the step there also holds the scheduler's and guidance's work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from runtime.bench.baselines import diffusers_pipeline
from runtime.bench.measure import BenchConfig
from runtime.bench.models import build_master, pipeline_for


def unet_calls(config: BenchConfig, scratch: Path):
    """(ours, theirs): zero-argument callables, each one guided UNet call on the same inputs."""
    master = build_master(config, scratch)
    ours = pipeline_for("torch", master, config.device, config.dtype).components.unet
    theirs = diffusers_pipeline(master, config).pipe.unet
    generator = torch.Generator().manual_seed(0)
    factor = 2 ** (len(master.vae.config.block_out_channels) - 1)
    latent = (config.height // factor, config.width // factor)
    sample = torch.randn(2, ours.config.in_channels, *latent, generator=generator)
    context = torch.randn(2, 77, ours.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500, 500])
    with torch.inference_mode():
        expected = theirs(sample, timestep, encoder_hidden_states=context).sample
        got = ours(sample, timestep, context)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()):
        raise RuntimeError("the two UNets disagree on the same inputs: the ratio would compare different work")

    def call_ours():
        with torch.inference_mode():
            ours(sample, timestep, context)

    def call_theirs():
        with torch.inference_mode():
            theirs(sample, timestep, encoder_hidden_states=context)

    return call_ours, call_theirs


def alternate(a, b, calls: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Wall times in ms of `calls` calls of each, in the order a b a b ..."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for _ in range(calls):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times_a, times_b


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    config = BenchConfig(
        preset=args.preset, device="cpu", dtype="fp32", width=args.width, height=args.height, steps=2, step_iters=20
    )
    with tempfile.TemporaryDirectory() as scratch:
        ours, theirs = unet_calls(config, Path(scratch))
        times_ours, times_theirs = alternate(ours, theirs, args.calls)
    pairs = [a / b for a, b in zip(times_ours, times_theirs)]
    med_ours, med_theirs = statistics.median(times_ours), statistics.median(times_theirs)
    print(f"{args.preset} {args.width}x{args.height}, guided UNet call, {args.calls} calls each, alternated")
    print(f"torch {med_ours:.2f} ms, diffusers {med_theirs:.2f} ms (medians): ratio {med_ours / med_theirs:.3f}")
    p10, p90 = np.percentile(pairs, [10, 90])
    print(f"per-pair ratio: median {statistics.median(pairs):.3f}, p10 {p10:.3f}, p90 {p90:.3f}")


if __name__ == "__main__":
    main()
