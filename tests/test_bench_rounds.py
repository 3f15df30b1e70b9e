"""runtime.bench's fairness arithmetic (no timings): interleaved order, spreads, per-round ratios, labels."""

import pytest

from runtime.bench.measure import BenchConfig, row_labels
from runtime.bench.rounds import round_ratios, round_robin, spread


def test_rounds_interleave_every_row_once_per_round():
    assert round_robin(["torch", "triton", "diffusers"], 2) == [
        (0, "torch"),
        (0, "triton"),
        (0, "diffusers"),
        (1, "torch"),
        (1, "triton"),
        (1, "diffusers"),
    ]


def test_round_robin_rejects_no_rounds_and_duplicate_labels():
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        round_robin(["torch"], 0)
    with pytest.raises(ValueError, match="row labels must be unique"):
        round_robin(["torch", "torch"], 2)


def test_repeated_backends_get_numbered_labels():
    assert row_labels(["torch", "torch"]) == [("torch#1", "torch"), ("torch#2", "torch")]
    assert row_labels(["torch", "onnxruntime"]) == [("torch", "torch"), ("onnxruntime", "onnxruntime")]


def test_spread_reports_median_percentiles_and_count():
    assert spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p10": 1.4, "p90": 4.6, "n": 5}
    with pytest.raises(ValueError, match="no samples"):
        spread([])


def test_ratios_are_taken_within_each_round_then_summarised():
    # Round medians: row 2, 6, 3; baseline 1, 2, 3 -> ratios 2, 3, 1. A drift shared by both sides in
    # round 2 (everything 2-3x slower) cancels within the round.
    row = [[1.0, 2.0, 3.0], [6.0, 6.0], [3.0]]
    baseline = [[1.0], [2.0, 2.0, 2.0], [2.0, 4.0]]
    assert round_ratios(row, baseline) == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": 3}


def test_a_round_without_samples_on_either_side_is_left_out():
    assert round_ratios([[2.0], [], [4.0]], [[1.0], [1.0], []]) == {"median": 2.0, "min": 2.0, "max": 2.0, "rounds": 1}
    assert round_ratios([[]], [[1.0]]) is None


def test_round_count_covers_the_requested_step_samples():
    config = BenchConfig(preset="tiny", device="cpu", dtype="fp32", width=64, height=64, steps=11, step_iters=50)
    assert config.round_count == 5  # 10 intervals per image, 50 wanted
    short = BenchConfig(preset="tiny", device="cpu", dtype="fp32", width=64, height=64, steps=21, step_iters=20)
    assert short.round_count == 3  # never fewer than 3 rounds: a ratio needs a range
    assert (
        BenchConfig(
            preset="tiny", device="cpu", dtype="fp32", width=64, height=64, steps=21, step_iters=20, rounds=2
        ).round_count
        == 2
    )
