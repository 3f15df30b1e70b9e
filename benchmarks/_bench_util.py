"""Shared helpers for kernel benchmarks: environment stamp, timing, JSON rows.

Kept deliberately small; every benchmark under benchmarks/ imports these three functions so that
all result files carry the same provenance fields (GPU, versions, git SHA).
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable

# One provenance stamp for every result file, kernel benchmarks and runtime.bench alike.
from runtime.provenance import environment


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
