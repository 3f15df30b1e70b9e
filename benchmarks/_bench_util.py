"""Shared helpers for kernel benchmarks: environment stamp, timing, JSON rows.

Kept deliberately small; every benchmark under benchmarks/ imports these three functions so that
all result files carry the same provenance fields (GPU, versions, git SHA).
"""
from __future__ import annotations

import datetime
import json
import pathlib
import platform
import subprocess
from typing import Callable

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + "-dirty" if dirty else sha) or "unknown"


def environment() -> dict:
    """Provenance of a benchmark run: GPU name, torch / triton / CUDA versions, git SHA, time."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median wall time of `fn` in milliseconds, measured with CUDA events by triton's do_bench
    (which warms up first and flushes L2 between repetitions)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def write_json(path: str | pathlib.Path, rows: list[dict], extra: dict | None = None) -> None:
    """Write {"environment": environment(), **extra, "rows": rows} to `path` (parents created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **(extra or {}), "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
