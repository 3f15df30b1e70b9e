"""A real server on 127.0.0.1 (uvicorn in a thread, on a free port) over the tiny random model."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import numpy as np
import PIL.Image
import pytest
import uvicorn

import runtime
from runtime.bench.presets import write_random_model
from runtime.serve.app import create_app
from runtime.serve.settings import ServeSettings

STEPS = 4  # small, so each image takes a fraction of a second on a CPU
SIZE = 64  # the tiny model's native size


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_path):
    return runtime.load(tiny_model_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(pipelines, **settings):
    """Serve `pipelines` with ServeSettings(**settings) on a free port; yields the base URL."""
    settings = ServeSettings(port=free_port(), **settings)
    app = create_app(pipelines, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}", app
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_pipe):
    """(base URL, app) of a server with an API key, shared by a test module."""
    with running_server({"tiny": tiny_pipe}, api_key="test-key") as running:
        yield running


def served_pixels(b64: str) -> np.ndarray:
    """The RGB pixels of a base64 PNG the server returned."""
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def in_process_twin(pipe, body: dict) -> np.ndarray:
    """The pixels `pipe` makes in-process for an A1111 txt2img `body` with sampler "Euler"."""
    assert body["sampler_name"] == "Euler"
    image = pipe.generate(
        body["prompt"],
        seed=body["seed"],
        guidance=body["cfg_scale"],
        steps=body["steps"],
        width=body["width"],
        height=body["height"],
        scheduler="euler",
        progress=False,
    )[0]
    return np.asarray(image)
