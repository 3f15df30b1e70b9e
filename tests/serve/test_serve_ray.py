"""Ray Serve: a local Ray on the CPU, two replicas of the deployment, the same HTTP API through Ray's proxy."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import openai
import PIL.Image
import pytest

from runtime.serve import ray_app
from runtime.serve.settings import ServeSettings
from tests.serve.conftest import SIZE, STEPS, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_server(tiny_model_path):
    # Replicas are new processes: they must import this checkout, not whatever the environment installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_app.deployment(
            {"tiny": str(tiny_model_path)},
            {"backend": "torch", "device": "cpu", "dtype": "fp32"},
            ServeSettings(),
            replicas=2,
        )
        serve.run(app, name=ray_app.DEPLOYMENT_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_openai_api(ray_server, tiny_pipe):
    status = serve.status().applications[ray_app.DEPLOYMENT_NAME]
    replicas = status.deployments[ray_app.DEPLOYMENT_NAME].replica_states
    assert replicas.get("RUNNING") == 2, replicas
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0)
    result = client.images.generate(prompt="a harbour", size=f"{SIZE}x{SIZE}", extra_body={"seed": 4, "steps": STEPS})
    served = PIL.Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    local = tiny_pipe.generate("a harbour", seed=4, steps=STEPS, width=SIZE, height=SIZE, progress=False)[0]
    # A replica is another process with one CPU thread (Ray sets OMP_NUM_THREADS=1), so fp32 sums run in
    # another order: a pixel may round to the neighbouring level, no more.
    difference = np.abs(np.asarray(served.convert("RGB")).astype(int) - np.asarray(local).astype(int))
    assert difference.max() <= 1
    assert served.text["parameters"] == local.info["parameters"]


def test_replica_settings():
    """One GPU per replica on CUDA; autoscaling bounds reach the deployment's options."""
    app = ray_app.deployment({"m": "/x"}, {"device": "cuda"}, ServeSettings(), replicas=1, max_replicas=4)
    options = app._bound_deployment._deployment_config
    assert options.autoscaling_config.min_replicas == 1 and options.autoscaling_config.max_replicas == 4
    assert app._bound_deployment.ray_actor_options["num_gpus"] == 1
    with pytest.raises(ValueError, match="max-replicas"):
        ray_app.deployment({"m": "/x"}, {}, ServeSettings(), replicas=3, max_replicas=2)
