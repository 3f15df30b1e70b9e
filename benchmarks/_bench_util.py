"""Shared helpers for kernel benchmarks: timing, and the result file every benchmark writes.

Result files use runtime.bench's one layout and provenance stamp (runtime/bench/results.py), so kernel
rows and pipeline rows carry the same fields (schema, provenance: device, versions, git; config; rows).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from runtime.bench.provenance import provenance  # noqa: F401 -- re-exported for the benchmarks
from runtime.bench.results import write_result  # noqa: F401


def time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median wall time of `fn` in milliseconds, measured with CUDA events by triton's do_bench
    (which warms up first and flushes L2 between repetitions). Without CUDA (the --dry-run rehearsal,
    Triton interpreted) the median of three wall-clock calls after one warm-up: the same code path,
    no meaningful number."""
    import torch

    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def dry_run_shape(extent: int, limit: int = 4) -> int:
    """A spatial or sequence extent cut down for the CPU rehearsal (the interpreter is ~1e5x slower)."""
    return min(extent, limit)
