"""Under load: batching happens, no request is lost or mixed up, the queue bound answers 429, and
timed-out, disconnected or interrupted work stops."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.serve.conftest import in_process_twin, running_server, served_pixels

LOAD_SIZE, LOAD_STEPS = 32, 2  # the smallest the tiny model makes: the test is about the queue
LONG_STEPS = 150  # a request that takes seconds, to be cancelled long before it ends
# The example: 64 requests from 16 clients (max_batch 8), each checked against its solo twin (~7 s).
REQUESTS, CLIENTS = 64, 16


def _request(index: int) -> dict:
    """Each request its own prompt, seed and guidance; all share size, steps and scheduler (one batch key)."""
    return {
        "prompt": f"request number {index}",
        "seed": 1000 + index,
        "cfg_scale": 3.0 + (index % 5),
        "steps": LOAD_STEPS,
        "width": LOAD_SIZE,
        "height": LOAD_SIZE,
        "sampler_name": "Euler",
    }


def _loops(app) -> int:
    return app.state.service.models["tiny"].batcher.progress.batches_run


def test_concurrent_clients_are_batched_and_each_gets_its_own_image(tiny_pipe):
    with running_server({"tiny": tiny_pipe}, max_batch=8, max_wait_ms=50, max_queue=REQUESTS) as (url, app):
        with httpx.Client(base_url=url, timeout=300) as client:
            with ThreadPoolExecutor(CLIENTS) as pool:
                responses = list(
                    pool.map(lambda i: client.post("/sdapi/v1/txt2img", json=_request(i)), range(REQUESTS))
                )
        loops = _loops(app)
    assert [r.status_code for r in responses] == [200] * REQUESTS
    for index, response in enumerate(responses):
        local = in_process_twin(tiny_pipe, _request(index))
        served = served_pixels(response.json()["images"][0])
        # batched: equal up to fp32 rounding, at most one level of 255; alone: bit for bit
        tolerance = 1 if loops < REQUESTS else 0
        assert np.abs(served.astype(int) - local.astype(int)).max() <= tolerance, index
    assert loops < REQUESTS


def _start_long(url: str, results: list, **extra) -> threading.Thread:
    body = {"prompt": "long", "steps": LONG_STEPS, "seed": 1, "width": 64, "height": 64, **extra}
    thread = threading.Thread(
        target=lambda: results.append(httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120))
    )
    thread.start()
    return thread


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_past_the_queue_bound_429_and_interrupt(tiny_pipe):
    with running_server({"tiny": tiny_pipe}, max_batch=1, max_queue=1) as (url, app):
        batcher = app.state.service.models["tiny"].batcher
        long_result, queued_result = [], []
        long_thread = _start_long(url, long_result)
        _wait_until(lambda: batcher.progress.running == 1 and batcher.progress.step > 0, "the long run to start")
        queued = threading.Thread(
            target=lambda: queued_result.append(
                httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "q", "steps": 1, "seed": 2}, timeout=120)
            )
        )
        queued.start()
        _wait_until(lambda: batcher.queue_depth == 1, "the second request to queue")
        refused = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "extra": 1}, timeout=30)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
        assert "busy" in refused.json()["error"]["message"]
        assert httpx.post(url + "/sdapi/v1/interrupt").status_code == 200
        long_thread.join(60)
        queued.join(60)
        assert long_result[0].status_code == 409 and "interrupted" in long_result[0].json()["detail"]
        assert queued_result[0].status_code == 200
        metrics = httpx.get(url + "/metrics").text
    assert 'sd_requests_total{route="/v1/images/generations",status="429"} 1.0' in metrics
    assert 'sd_cancelled_total{reason="interrupted"} 1.0' in metrics


def test_timeout_answers_504_and_stops_the_run(tiny_pipe):
    with running_server({"tiny": tiny_pipe}, request_timeout_s=0.5) as (url, app):
        batcher = app.state.service.models["tiny"].batcher
        results = []
        _start_long(url, results).join(60)
        assert results[0].status_code == 504 and "longer than" in results[0].json()["detail"]
        _wait_until(lambda: batcher.progress.running == 0, "the cancelled run to stop")
        assert batcher.progress.step < LONG_STEPS  # stopped early, not run to the end
        assert httpx.get(url + "/health").json()["models"]["tiny"]["worker_alive"] is True
        assert 'sd_cancelled_total{reason="timeout"} 1.0' in httpx.get(url + "/metrics").text


def test_a_disconnected_clients_work_is_cancelled(tiny_pipe):
    with running_server({"tiny": tiny_pipe}) as (url, app):
        batcher = app.state.service.models["tiny"].batcher
        body = {"prompt": "long", "steps": LONG_STEPS, "seed": 1, "width": 64, "height": 64}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=httpx.Timeout(60, read=0.5))
        _wait_until(
            lambda: 'sd_cancelled_total{reason="disconnected"} 1.0' in httpx.get(url + "/metrics").text,
            "the server to notice the client left",
        )
        _wait_until(lambda: batcher.progress.running == 0, "the cancelled run to stop")
        assert batcher.progress.step < LONG_STEPS
