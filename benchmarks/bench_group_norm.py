"""GroupNorm(+SiLU): our Triton kernel vs F.group_norm + F.silu (eager and torch.compile) on CUDA.

    python -m benchmarks.bench_group_norm --json benchmarks/results/group_norm.json

Shapes are the GroupNorms of the SD 1.5 / SD 2.x / SDXL UNets and the SD VAE at batch 1 and 2, in
fp16, NCHW and channels_last. Reports the median time (triton.testing.do_bench), GB/s counting one
read of x and one write of y (the unavoidable traffic), that as a % of the device copy bandwidth
measured in the same run, and the speed-up over torch. channels_last rows also time the per-group
tiles (the fallback path, scalar loads in that layout) next to the chunked vectorised kernels; rows whose
groups take the one-pass or the looped kernel also time the split kernels the launcher would otherwise
take (split_kernels_ms: the evidence for ONE_PASS_MAX_LANES and LOOPED_MAX_GROUP_ELEMENTS on a real
GPU), and rows that do not take the looped kernel time it too (looped_kernel_ms); every row records the
launch configuration chosen.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks._bench_util import dry_run_shape, provenance, time_ms, write_result

# (label, channels, H, W): each distinct GroupNorm input of the networks at their native resolution.
SHAPES = [
    ("sd15-unet-l0", 320, 64, 64),
    ("sd15-unet-l0-up", 640, 64, 64),
    ("sd15-unet-l0-up-cat", 960, 64, 64),
    ("sd15-unet-l1", 640, 32, 32),
    ("sd15-unet-l1-cat", 1280, 32, 32),
    ("sd15-unet-l1-up-cat", 1920, 32, 32),
    ("sd15-unet-l2", 1280, 16, 16),
    ("sd15-unet-l2-cat", 2560, 16, 16),
    ("sd15-unet-l3", 1280, 8, 8),
    ("sd2-768-unet-l0", 320, 96, 96),
    ("sd2-768-unet-l1", 640, 48, 48),
    ("sdxl-unet-l0", 320, 128, 128),
    ("sdxl-unet-l1", 640, 64, 64),
    ("sdxl-unet-l2", 1280, 32, 32),
    ("sdxl-unet-l2-cat", 2560, 32, 32),
    ("vae512-dec-l0", 512, 64, 64),
    ("vae512-dec-l1", 512, 128, 128),
    ("vae512-dec-l2-in", 512, 256, 256),
    ("vae512-dec-l2", 256, 256, 256),
    ("vae512-dec-l3-in", 256, 512, 512),
    ("vae512-dec-l3", 128, 512, 512),
]


DEVICE = "cuda"  # "cpu" in the --dry-run rehearsal (Triton interpreted)
DRY_RUN_SM_COUNT = 132  # an H100's, for the launch-configuration choice when there is no device to ask


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second, the practical ceiling."""
    src = torch.empty(2**29 if DEVICE == "cuda" else 2**20, dtype=torch.float16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def compiled_torch_baseline():
    """A fresh torch.compile of F.group_norm + F.silu. Fresh per row: past `recompile_limit` (8) shapes
    of one function dynamo stops compiling and would silently time eager code under this column."""
    torch._dynamo.reset()
    return torch.compile(lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-5)), dynamic=False)


def sm_count() -> int:
    if DEVICE != "cuda":
        return DRY_RUN_SM_COUNT
    return torch.cuda.get_device_properties(0).multi_processor_count


def per_group_tiles_ms(gn, x, weight, bias, out) -> float:
    """channels_last input through the per-group kernels (what served it before the chunked path)."""
    batch, channels, h, w = x.shape
    config = gn.choose_config(batch, channels // 32, h * w, 32, True, sm_count())
    return time_ms(lambda: gn.launch(x, 32, weight, bias, 1e-5, "silu", out, config))


def chosen_config(gn, x, out) -> str:
    return repr(gn.plan(x, 32, out, sm_count()))


def split_kernels_ms(gn, x, weight, bias, out) -> float | None:
    """Where the launcher takes a single-launch kernel (one-pass or looped): the split kernels it would
    take otherwise."""
    if not isinstance(gn.plan(x, 32, out, sm_count()), (gn.OnePassConfig, gn.LoopedConfig)):
        return None
    config = gn.plan(x, 32, out, sm_count(), allow_one_pass=False, allow_looped=False)
    return time_ms(lambda: gn.launch(x, 32, weight, bias, 1e-5, "silu", out, config))


def looped_kernel_ms(gn, x, weight, bias, out) -> float | None:
    """Where the launcher does not take the looped kernel: the looped kernel on the split kernels' tiles
    (the evidence for moving LOOPED_MAX_GROUP_ELEMENTS up, or ONE_PASS_MAX_LANES down)."""
    if isinstance(gn.plan(x, 32, out, sm_count()), gn.LoopedConfig):
        return None
    batch, channels, h, w = x.shape
    tiles = gn.choose_config(batch, channels // 32, h * w, 32, x.stride(1) == 1, sm_count())
    config = gn.LoopedConfig(tiles.block_hw, tiles.block_c, tiles.num_c_tiles, tiles.num_tiles, tiles.num_warps)
    return time_ms(lambda: gn.launch(x, 32, weight, bias, 1e-5, "silu", out, config))


def bench_shape(label, batch, channels, h, w, channels_last, gn, compiled_torch) -> dict:
    group_norm = gn.group_norm
    x = torch.randn(batch, channels, h, w, device=DEVICE, dtype=torch.float16) * 2 + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(channels, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(channels, device=DEVICE, dtype=torch.float16)
    out = torch.empty_like(x)
    ours_ms = time_ms(lambda: group_norm(x, 32, weight, bias, activation="silu", out=out))
    torch_ms = time_ms(lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-5)))
    compiled_ms = time_ms(lambda: compiled_torch(x, weight, bias)) if compiled_torch else None
    per_group_ms = per_group_tiles_ms(gn, x, weight, bias, out) if channels_last else None
    split_ms = split_kernels_ms(gn, x, weight, bias, out)
    looped_ms = looped_kernel_ms(gn, x, weight, bias, out)
    moved = 2 * x.numel() * x.element_size()
    return {
        "shape": label,
        "batch": batch,
        "channels": channels,
        "height": h,
        "width": w,
        "memory_format": "channels_last" if channels_last else "nchw",
        "dtype": "float16",
        "activation": "silu",
        "config": chosen_config(gn, x, out),
        "ours_ms": ours_ms,
        "per_group_tiles_ms": per_group_ms,
        "split_kernels_ms": split_ms,
        "looped_kernel_ms": looped_ms,
        "torch_ms": torch_ms,
        "torch_compile_ms": compiled_ms,
        "ours_gbs": moved / ours_ms / 1e6,
        "speedup_vs_torch": torch_ms / ours_ms,
        "speedup_vs_torch_compile": compiled_ms / ours_ms if compiled_ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the result rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU rehearsal: Triton interpreter, two SD 1.5 shapes cut to 4x4, no torch.compile",
    )
    args = parser.parse_args(argv)
    global DEVICE
    shapes, batches = SHAPES, (1, 2)
    if args.dry_run:
        DEVICE, args.no_compile, batches = "cpu", True, (1,)
        shapes = [(label, c, dry_run_shape(h), dry_run_shape(w)) for label, c, h, w in SHAPES[:2]]
    elif not torch.cuda.is_available():
        print("no CUDA: skipped (--dry-run rehearses on the CPU)")
        return 0
    import kernels.group_norm as gn

    copy_gbs = copy_bandwidth_gbs()
    stamp = provenance()
    print(f"{stamp['device']}: device copy {copy_gbs:.0f} GB/s")
    rows = []
    for label, channels, h, w in shapes:
        for batch in batches:
            for channels_last in (False, True):
                compiled_torch = None if args.no_compile else compiled_torch_baseline()
                row = bench_shape(label, batch, channels, h, w, channels_last, gn, compiled_torch)
                row["pct_of_copy_bandwidth"] = 100 * row["ours_gbs"] / copy_gbs
                rows.append(row)
                compiled = f"{row['torch_compile_ms']:.4f}" if row["torch_compile_ms"] else "-"
                per_group = f"{row['per_group_tiles_ms']:.4f}" if row["per_group_tiles_ms"] else "-"
                split = f"{row['split_kernels_ms']:.4f}" if row["split_kernels_ms"] else "-"
                looped = f"{row['looped_kernel_ms']:.4f}" if row["looped_kernel_ms"] else "-"
                print(
                    f"{label:22s} b{batch} {row['memory_format']:13s} ours {row['ours_ms']:.4f} ms "
                    f"({row['ours_gbs']:.0f} GB/s, {row['pct_of_copy_bandwidth']:.0f}% of copy) "
                    f"per-group tiles {per_group} ms split {split} ms looped {looped} ms "
                    f"torch {row['torch_ms']:.4f} ms compile {compiled} ms "
                    f"speed-up {row['speedup_vs_torch']:.2f}x",
                    flush=True,
                )
                # Rewritten after every row, so a run cut short by a time limit keeps what it measured.
                write_result(
                    args.json,
                    "group_norm",
                    {"compile_baseline": not args.no_compile, "dry_run": args.dry_run},
                    rows,
                    stamp,
                    copy_bandwidth_gbs=copy_gbs,
                )
    print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
