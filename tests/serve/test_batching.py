"""The Batcher's grouping, bounds, cancellation and error isolation, with a recording runner (no model)."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.serve.batching import Batcher, Cancelled, Job, QueueFull


class Runner:
    """Records each batch's params; the first batch blocks until `release` is set, so that jobs queue up
    behind it deterministically."""

    def __init__(self, fail_on=None, steps=1):
        self.batches: list[list] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_on, self.steps = fail_on, steps
        self.stopped_early = False

    def __call__(self, params, callback):
        self.batches.append(list(params))
        self.started.set()
        self.release.wait(10)
        for _ in range(self.steps):
            if callback(0, 0, None) is False:
                self.stopped_early = True
                raise RuntimeError("cancelled by the callback")
        if self.fail_on is not None and self.fail_on in params:
            raise ValueError(f"bad request {self.fail_on}")
        return [[f"image of {p}"] for p in params]


def _job(params, key="a", images=1):
    return Job(params, key, images)


def _batcher(runner, **options):
    defaults = dict(max_batch=4, max_wait_ms=0, max_queue=16)
    return Batcher(runner, **{**defaults, **options})


def test_equal_keys_share_a_batch_up_to_max_batch_and_others_keep_their_place():
    runner = Runner()
    batcher = _batcher(runner)
    try:
        blocker = _job("first", key="x")
        batcher.submit([blocker])
        assert runner.started.wait(5)
        jobs = [_job("a1"), _job("b1", key="b"), _job("a2", images=2), _job("a3"), _job("a4"), _job("b2", key="b")]
        batcher.submit(jobs)
        runner.release.set()
        for job in jobs:
            assert job.future.result(5) == [f"image of {job.params}"]
    finally:
        batcher.close()
    # a1 + a2 (2 images) + a3 fill max_batch 4; a4 waits for the next a-batch, after the b's
    assert runner.batches == [["first"], ["a1", "a2", "a3"], ["b1", "b2"], ["a4"]]
    assert batcher.progress.batches_run == 4


def test_the_first_request_waits_max_wait_ms_for_companions():
    runner = Runner()
    runner.release.set()
    batcher = _batcher(runner, max_wait_ms=300)
    try:
        first = _job("a1")
        batcher.submit([first])
        time.sleep(0.05)  # well inside the 300 ms window
        second = _job("a2")
        batcher.submit([second])
        assert first.future.result(5) and second.future.result(5)
    finally:
        batcher.close()
    assert runner.batches == [["a1", "a2"]]


def test_queue_bound_is_all_or_nothing():
    runner = Runner()
    batcher = _batcher(runner, max_queue=3)
    try:
        batcher.submit([_job("running")])
        assert runner.started.wait(5)
        batcher.submit([_job("q1"), _job("q2")])
        with pytest.raises(QueueFull):
            batcher.submit([_job("q3"), _job("q4")])  # 2 + 2 > 3: neither is queued
        assert batcher.queue_depth == 2
        batcher.submit([_job("q3")])
        assert batcher.queue_depth == 3
    finally:
        runner.release.set()
        batcher.close()


def test_a_cancelled_queued_job_never_runs():
    runner = Runner()
    batcher = _batcher(runner)
    try:
        batcher.submit([_job("running", key="x")])
        assert runner.started.wait(5)
        gone, kept = _job("gone"), _job("kept")
        batcher.submit([gone, kept])
        gone.cancel("disconnected")
        runner.release.set()
        assert kept.future.result(5) == ["image of kept"]
        with pytest.raises(Cancelled, match="disconnected"):
            gone.future.result(0)
    finally:
        batcher.close()
    assert runner.batches == [["running"], ["kept"]]


def test_a_running_batch_stops_once_all_its_jobs_are_cancelled():
    runner = Runner(steps=3)
    batcher = _batcher(runner)
    try:
        job = _job("long")
        batcher.submit([job])
        assert runner.started.wait(5)
        assert batcher.interrupt() == 1
        runner.release.set()
        with pytest.raises(Cancelled, match="interrupted"):
            job.future.result(5)
        deadline = time.monotonic() + 5
        while not runner.stopped_early and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.stopped_early
    finally:
        batcher.close()


def test_one_bad_request_fails_alone_and_the_worker_lives_on():
    runner = Runner(fail_on="bad")
    batcher = _batcher(runner)
    try:
        batcher.submit([_job("running", key="x")])
        assert runner.started.wait(5)
        good, bad = _job("good"), _job("bad")
        batcher.submit([good, bad])
        runner.release.set()
        assert good.future.result(5) == ["image of good"]
        with pytest.raises(ValueError, match="bad request"):
            bad.future.result(5)
        after = _job("after")
        batcher.submit([after])
        assert after.future.result(5) == ["image of after"] and batcher.alive
    finally:
        batcher.close()
    assert runner.batches == [["running"], ["good", "bad"], ["good"], ["bad"], ["after"]]


def test_close_cancels_what_is_queued():
    runner = Runner()
    batcher = _batcher(runner)
    batcher.submit([_job("running", key="x")])
    assert runner.started.wait(5)
    queued = _job("queued")
    batcher.submit([queued])
    threading.Timer(0.2, runner.release.set).start()  # the running batch ends while close() waits for it
    batcher.close()
    with pytest.raises(Cancelled, match="shutdown"):
        queued.future.result(0)
    assert not batcher.alive
