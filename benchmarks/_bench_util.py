"""Shared helpers for kernel benchmarks: timing, and the result file every benchmark writes.

Result files use runtime.bench's one layout and provenance stamp (runtime/bench/results.py), so kernel
rows and pipeline rows carry the same fields (schema, provenance: device, versions, git; config; rows).
"""
from __future__ import annotations

from typing import Callable

from runtime.bench.provenance import provenance  # noqa: F401 -- re-exported for the benchmarks
from runtime.bench.results import write_result  # noqa: F401


def time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median wall time of `fn` in milliseconds, measured with CUDA events by triton's do_bench
    (which warms up first and flushes L2 between repetitions)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
