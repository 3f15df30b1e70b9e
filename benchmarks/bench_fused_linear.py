"""Fused-epilogue GEMMs (kernels/fused_linear.py) vs cuBLAS F.linear + the separate pass they replace, on CUDA.

    python -m benchmarks.bench_fused_linear --json benchmarks/results/fused_linear.json

Shapes are the feed-forwards and proj_outs of the SD 1.5 / SD 2.x (768 px) / SDXL UNets at batch 2 (the
guided step), fp16. Three ops per level: the GEGLU projection (ours: one launch; baseline: F.linear then
kernels.geglu, and F.linear then torch's chunk * gelu), the ff output + residual and proj_out + residual
(ours: one launch; baseline: F.linear then the add). Reports the median time (triton.testing.do_bench),
TFLOP/s of the matrix work, the speed-up over each baseline, and the launch configuration chosen.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from benchmarks._bench_util import dry_run_shape, provenance, time_ms, write_result

# (label, tokens per image, channels C): the ff projects C -> 8C, GEGLU halves it to 4C, back to C.
SHAPES = [
    ("sd15-l0", 64 * 64, 320),
    ("sd15-l1", 32 * 32, 640),
    ("sd15-l2", 16 * 16, 1280),
    ("sd15-l3", 8 * 8, 1280),
    ("sd2-768-l0", 96 * 96, 320),
    ("sdxl-l1", 64 * 64, 640),
    ("sdxl-l2", 32 * 32, 1280),
]
BATCH = 2
DEVICE = "cuda"  # "cpu" in the --dry-run rehearsal (Triton interpreted)


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float16) * scale


def bench_level(label: str, tokens: int, c: int, fl, gg) -> list[dict]:
    m = BATCH * tokens
    inner = 4 * c
    x, res = _rand(m, c), _rand(m, c)
    w_proj, b_proj = _rand(2 * inner, c, scale=c**-0.5), _rand(2 * inner)
    h, w_out, b_out = _rand(m, inner), _rand(c, inner, scale=inner**-0.5), _rand(c)
    w_po, b_po = _rand(c, c, scale=c**-0.5), _rand(c)

    def torch_geglu():
        a, g = F.linear(x, w_proj, b_proj).chunk(2, dim=-1)
        return a * F.gelu(g)

    cases = [
        (
            "linear_geglu",
            (m, 2 * inner, c),
            lambda: fl.linear_geglu(x, w_proj, b_proj),
            {"linear_then_geglu_kernel": lambda: gg.geglu(F.linear(x, w_proj, b_proj)), "torch": torch_geglu},
            fl.choose_config(m, x.dtype, geglu=True),
        ),
        (
            "ff_out_residual",
            (m, c, inner),
            lambda: fl.linear_bias_residual(h, w_out, b_out, res),
            {"torch": lambda: F.linear(h, w_out, b_out) + res},
            fl.choose_config(m, x.dtype, geglu=False),
        ),
        (
            "proj_out_residual",
            (m, c, c),
            lambda: fl.linear_bias_residual(x, w_po, b_po, res),
            {"torch": lambda: F.linear(x, w_po, b_po) + res},
            fl.choose_config(m, x.dtype, geglu=False),
        ),
    ]
    rows = []
    for op, (rows_m, n, k), ours, baselines, config in cases:
        ours_ms = time_ms(ours)
        row = {
            "shape": label,
            "op": op,
            "m": rows_m,
            "n": n,
            "k": k,
            "dtype": "float16",
            "config": dataclasses.asdict(config),
            "ours_ms": ours_ms,
            "ours_tflops": 2 * rows_m * n * k / ours_ms / 1e9,
        }
        for name, fn in baselines.items():
            row[f"{name}_ms"] = time_ms(fn)
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ours_ms
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the result rows")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU rehearsal: Triton interpreter, two SD 1.5 levels at 4 tokens"
    )
    args = parser.parse_args(argv)
    global DEVICE
    shapes = SHAPES
    if args.dry_run:
        DEVICE = "cpu"
        shapes = [(label, dry_run_shape(tokens), c) for label, tokens, c in SHAPES[:2]]
    elif not torch.cuda.is_available():
        print("no CUDA: skipped (--dry-run rehearses on the CPU)")
        return 0
    import kernels.fused_linear as fl
    import kernels.geglu as gg

    stamp = provenance()
    rows = []
    for label, tokens, c in shapes:
        for row in bench_level(label, tokens, c, fl, gg):
            rows.append(row)
            baselines = " ".join(
                f"{key[: -len('_ms')]} {row[key]:.4f} ms ({row['speedup_vs_' + key[: -len('_ms')]]:.2f}x)"
                for key in row
                if key.endswith("_ms") and key != "ours_ms"
            )
            print(
                f"{label:12s} {row['op']:18s} ours {row['ours_ms']:.4f} ms "
                f"({row['ours_tflops']:.0f} TFLOP/s) {baselines}",
                flush=True,
            )
            # Rewritten after every row, so a run cut short by a time limit keeps what it measured.
            write_result(args.json, "fused_linear", {"batch": BATCH, "dry_run": args.dry_run}, rows, stamp)
    print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
