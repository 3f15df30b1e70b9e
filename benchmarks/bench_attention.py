"""Our attention kernel against every torch SDPA backend, on the shapes SD 1.5, SD 2.x and SDXL run.

    python -m benchmarks.bench_attention --json benchmarks/results/attention.json [--dtype bf16] [--sweep]

Inputs are head-split views of [B, N, H*D] projections, as the UNet passes them, for every
contender. Each row: shape, per-backend median time and TFLOP/s (4*B*H*Nq*Nk*D flops), our
speed-up over the fastest SDPA backend that ran, and our max difference from it. --sweep also
times alternative tilings of our kernel per shape (to retune choose_config on a new card).
Exits 0 with "no CUDA: skipped" on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

# (model, B, H, Nq, Nk, D): every attention of a guided (B=2) UNet step at the default resolution.
SHAPES = [
    *[("sd15", 2, 8, n, nk, d) for n, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)) for nk in (n, 77)],
    *[("sd2", 2, h, n, nk, 64) for n, h in ((4096, 5), (1024, 10), (256, 20), (9216, 5)) for nk in (n, 77)],
    *[("sdxl", 2, h, n, nk, 64) for n, h in ((4096, 10), (1024, 20)) for nk in (n, 77)],
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda"  # "cpu" in the --dry-run rehearsal (Triton interpreted)


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def _inputs(b, h, nq, nk, d, dtype):
    def proj(n):  # the head split of a [B, N, H*D] projection: strides (N*H*D, D, H*D, 1)
        return torch.randn(b, n, h * d, device=DEVICE, dtype=dtype).view(b, n, h, d).transpose(1, 2)

    return proj(nq), proj(nk), proj(nk)


def _sdpa_call(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def bench_shape(model, b, h, nq, nk, d, dtype, sweep: bool) -> dict:
    from benchmarks._bench_util import time_ms
    from kernels.attention import attention, choose_config

    q, k, v = _inputs(b, h, nq, nk, d, dtype)
    flops = 4.0 * b * h * nq * nk * d
    ours = attention(q, k, v)
    row = {
        "model": model,
        "B": b,
        "H": h,
        "Nq": nq,
        "Nk": nk,
        "D": d,
        "dtype": str(dtype).split(".")[-1],
        "config": vars(choose_config(d, nk)),
        "backends": {},
    }
    row["ours_ms"] = time_ms(lambda: attention(q, k, v))
    row["ours_tflops"] = _tflops(flops, row["ours_ms"])
    best = None
    for name, backend in _sdpa_backends().items():
        call = _sdpa_call(backend, q, k, v)
        try:
            expected = call()
        except RuntimeError as err:  # backend does not support this shape / dtype / card
            row["backends"][name] = {"error": str(err).splitlines()[0][:200]}
            continue
        ms = time_ms(call)
        diff = (ours.float() - expected.float()).abs().max().item()
        row["backends"][name] = {"ms": ms, "tflops": _tflops(flops, ms), "max_abs_diff_vs_ours": diff}
        if best is None or ms < row["backends"][best]["ms"]:
            best = name
    if best is not None:
        row["best_sdpa"] = best
        row["speedup_vs_best_sdpa"] = row["backends"][best]["ms"] / row["ours_ms"]
    if sweep:
        row["sweep"] = _sweep(q, k, v, flops)
    return row


def _sweep(q, k, v, flops) -> list[dict]:
    """Time alternative tilings (those that compile and fit the card) of our kernel for one shape."""
    from benchmarks._bench_util import time_ms
    from kernels.attention import AttentionConfig, empty_output, launch, split_head_dim

    d0, d1 = split_head_dim(q.shape[-1])
    out = empty_output(q)
    results = []
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)):
        cfg = AttentionConfig(block_m=bm, block_n=bn, block_d0=d0, block_d1=d1, num_warps=warps, num_stages=stages)
        try:
            ms = time_ms(lambda cfg=cfg: launch(q, k, v, out, None, cfg), rep_ms=50)
        except Exception as err:  # out of shared memory / registers for this tiling: skip it
            results.append({"config": vars(cfg), "error": type(err).__name__})
            continue
        results.append({"config": vars(cfg), "ms": ms, "tflops": _tflops(flops, ms)})
    return sorted(results, key=lambda r: r.get("ms", float("inf")))


def _print_row(row: dict) -> None:
    sdpa = "  ".join(
        f"{name} {r['tflops']:6.1f}" if "tflops" in r else f"{name}   n/a" for name, r in row["backends"].items()
    )
    speedup = row.get("speedup_vs_best_sdpa")
    verdict = f"x{speedup:.2f} vs {row['best_sdpa']}" if speedup else "no SDPA backend ran"
    print(
        f"{row['model']:5s} B={row['B']} H={row['H']:2d} Nq={row['Nq']:5d} Nk={row['Nk']:5d} D={row['D']:3d} "
        f"{row['dtype']:8s} ours {row['ours_ms']:8.4f} ms {row['ours_tflops']:6.1f} TFLOP/s | {sdpa} | {verdict}",
        flush=True,
    )
    tried = [r for r in row.get("sweep", []) if "ms" in r]
    if tried:
        print(f"      best tiling {tried[0]['config']} {tried[0]['tflops']:.1f} TFLOP/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tilings of our kernel")
    parser.add_argument("--model", choices=sorted({s[0] for s in SHAPES}), help="only this model's shapes")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU rehearsal: Triton interpreter, the SD 1.5 head dims at batch 1, one head, 16 tokens",
    )
    args = parser.parse_args(argv)
    global DEVICE
    shapes = SHAPES
    if args.dry_run:
        DEVICE = "cpu"
        shapes = [(model, 1, 1, min(nq, 16), 16 if nk == nq else nk, d) for model, _, _, nq, nk, d in SHAPES[:4]]
    elif not torch.cuda.is_available():
        print("no CUDA: skipped (--dry-run rehearses on the CPU)")
        return 0
    from benchmarks._bench_util import provenance, write_result

    stamp = provenance()
    print(stamp)
    rows = []
    for model, *shape in shapes:
        if args.model and model != args.model:
            continue
        rows.append(bench_shape(model, *shape, DTYPES[args.dtype], args.sweep))
        _print_row(rows[-1])
        if args.json:  # after every row, so a run cut short by a time limit keeps what it measured
            write_result(
                args.json,
                "attention",
                {"dtype": args.dtype, "sweep": args.sweep, "model": args.model, "dry_run": args.dry_run},
                rows,
                stamp,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
