"""One worker thread per pipeline, fed by a bounded queue; queued requests that may share one denoising
loop (equal batch keys) are run together.

The pipeline is not re-entrant (validation.ReentryGuard), so only the worker ever calls it. The worker
takes the oldest request, waits up to `max_wait_ms` from that request's arrival for others with the same
key (up to `max_batch` images), and runs them as one batch; requests with other keys keep their place.
Each request's Future gets its own images, or its own error: a batch that fails is run again request by
request, so one bad request cannot fail the others. A job cancelled while queued (client gone, timeout) is
dropped; a running batch stops at the next step once every job in it is cancelled.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: the caller should retry later (HTTP 429)."""


class Cancelled(Exception):
    """The job was cancelled (`reason`: "disconnected", "timeout", "interrupted", "shutdown")."""

    def __init__(self, reason: str):
        super().__init__(f"the request was cancelled ({reason})")
        self.reason = reason


@dataclass(eq=False)
class Job:
    """One queued request: `params` goes to the runner unchanged; `images` counts toward max_batch."""

    params: object
    key: Hashable
    images: int
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancel_reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Give up on this job: its future fails with Cancelled now; the worker skips or stops its work."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        _settle(self.future, None, Cancelled(reason))

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None


@dataclass
class Progress:
    """What the worker is doing now, for /sdapi/v1/progress."""

    running: int = 0  # jobs in the batch being denoised
    step: int = 0  # steps done in that batch
    steps: int = 0  # steps that batch runs
    batches_run: int = 0  # denoising loops started since the worker began


# (params of the jobs in one batch, step callback) -> one list of images per job, in order. The callback
# takes the pipeline's (step_index, timestep, latents) and returns False to stop the run.
RunBatch = Callable[[Sequence[object], Callable[..., bool]], list]


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        steps_of: Callable[[object], int] = lambda params: 0,
        observer=None,
        name: str = "model",
    ):
        """observer: optional object with queue_depth(n), batch_started(jobs), step_done(seconds),
        batch_finished(jobs, seconds, succeeded) (metrics.py's ModelMetrics)."""
        self._run_batch = run_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._steps_of = steps_of
        self._observer = observer
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self.progress = Progress()
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of `jobs` or none: QueueFull when they do not fit in max_queue."""
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is shut down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are queued already (max_queue {self.max_queue})")
            self._pending.extend(jobs)
            self._notify_depth()
            self._condition.notify_all()

    def interrupt(self) -> int:
        """Cancel the jobs of the running batch (A1111's /interrupt); returns how many."""
        with self._condition:
            running = list(self._running)
        for job in running:
            job.cancel("interrupted")
        return len(running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        with self._condition:
            return len(self._pending)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after its current batch; queued jobs fail with Cancelled("shutdown")."""
        with self._condition:
            self._closed = True
            dropped, self._pending = self._pending, []
            self._condition.notify_all()
        for job in dropped:
            job.cancel("shutdown")
        for job in self._running:
            job.cancel("shutdown")
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _notify_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(len(self._pending))

    def next_batch(self) -> list[Job] | None:
        """Block until a batch is ready (None once closed); the grouping rule of the module docstring."""
        with self._condition:
            while True:
                self._drop_cancelled()
                if self._closed:
                    return None
                if not self._pending:
                    self._condition.wait()
                    continue
                first = self._pending[0]
                batch = self._companions(first)
                wait = first.enqueued + self.max_wait - time.monotonic()
                if sum(job.images for job in batch) >= self.max_batch or wait <= 0:
                    taken = set(map(id, batch))
                    self._pending = [job for job in self._pending if id(job) not in taken]
                    self._notify_depth()
                    return batch
                self._condition.wait(wait)

    def _companions(self, first: Job) -> list[Job]:
        """`first` and the queued jobs after it with its key, in order, while they fit in max_batch."""
        batch, images = [first], first.images
        for job in itertools.islice(self._pending, 1, None):
            if job.key == first.key and images + job.images <= self.max_batch:
                batch.append(job)
                images += job.images
        return batch

    def _drop_cancelled(self) -> None:
        kept = [job for job in self._pending if not job.cancelled]
        if len(kept) != len(self._pending):
            self._pending = kept
            self._notify_depth()

    def _work(self) -> None:
        while (batch := self.next_batch()) is not None:
            try:
                self._run(batch)
            except BaseException as err:  # the worker must outlive any one batch
                log.exception("batch failed outside the runner")
                for job in batch:
                    _settle(job.future, None, err)

    def _run(self, batch: list[Job]) -> None:
        with self._condition:
            self._running = batch
        self.progress = Progress(len(batch), 0, self._steps_of(batch[0].params), self.progress.batches_run + 1)
        if self._observer is not None:
            self._observer.batch_started(batch)
        started = last = time.monotonic()

        def on_step(*_):
            nonlocal last
            now = time.monotonic()
            self.progress.step += 1
            if self._observer is not None:
                self._observer.step_done(now - last)
            last = now
            return not all(job.cancelled for job in batch)

        error = None
        try:
            results = self._run_batch([job.params for job in batch], on_step)
        except Exception as err:
            results, error = None, err
        finally:
            with self._condition:
                self._running = []
            self.progress.running = 0
        if self._observer is not None:
            self._observer.batch_finished(batch, time.monotonic() - started, error is None)
        if error is not None and len(batch) > 1 and not all(job.cancelled for job in batch):
            # find the request that failed: each alone, so the others still get their images
            log.warning("a batch of %d failed (%s); running its requests one by one", len(batch), error)
            for job in batch:
                if not job.cancelled:
                    self._run([job])
            return
        for index, job in enumerate(batch):
            _settle(job.future, None if results is None else results[index], error)


def _settle(future: concurrent.futures.Future, result, error: BaseException | None) -> None:
    """Resolve `future` unless a cancel got there first (it is set from another thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
