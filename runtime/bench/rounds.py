"""The arithmetic of a fair comparison, apart from any timing: the interleaved order rows run in, the
spread of their samples, and ratios computed round by round.

A round runs one unit of work of every row, in the rows' order (A B C, A B C, ...), so that whatever drifts
during a run (clocks, temperature, other processes, the page cache) falls on every row alike. A ratio
is taken within each round (row's median / baseline's median, the same round) and then summarised over
rounds: its median and range show how stable the claim is.
"""

from __future__ import annotations

import statistics

import numpy as np


def round_robin(labels: list[str], rounds: int) -> list[tuple[int, str]]:
    """[(round, label)] in the order they run: every label once per round, rounds one after another."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"row labels must be unique, got {labels}")
    return [(r, label) for r in range(rounds) for label in labels]


def spread(samples: list[float]) -> dict:
    """{"median", "p10", "p90", "n"} of `samples` (linear-interpolated percentiles)."""
    if not samples:
        raise ValueError("no samples to summarise")
    return {
        "median": statistics.median(samples),
        "p10": float(np.percentile(samples, 10)),
        "p90": float(np.percentile(samples, 90)),
        "n": len(samples),
    }


def round_ratios(row: list[list[float]], baseline: list[list[float]]) -> dict | None:
    """Per-round ratio median(row[r]) / median(baseline[r]), summarised as {"median", "min", "max",
    "rounds"}; rounds where either side has no samples are left out; None when none remain."""
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(row, baseline) if a and b]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}
