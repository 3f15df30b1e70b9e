"""Ray Serve: the same FastAPI app (app.py) in every replica, one replica per GPU, behind Ray's proxy.

    python -m runtime serve --ray --model tiny=/models/tiny --device cuda --replicas 4
    python -m runtime serve --ray ... --replicas 1 --max-replicas 8      # autoscaling between 1 and 8

On a cluster, start Ray on each node first (`ray start --head` on one, `ray start --address HEAD:6379` on the
others), then run the command on the head: Ray places replicas wherever a GPU is free. Each replica
loads the models itself (the paths must exist on every node) and batches its own requests; Ray's
proxy spreads requests over replicas. `deployment(...)` returns the bound app for `serve.run` or a
`serve run module:builder` config of your own.
"""

from __future__ import annotations

import dataclasses

DEPLOYMENT_NAME = "sd_runtime"


def deployment(
    models: dict[str, str],
    load_options: dict,
    settings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    num_gpus: float | None = None,
):
    """The bound Ray Serve application: `replicas` copies (or autoscaling from `replicas` to
    `max_replicas`), each holding `num_gpus` GPUs (default: 1 when the models load on CUDA, else 0)."""
    from ray import serve

    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ValueError(f"--replicas must be >= 1 and --max-replicas >= --replicas, got {replicas}, {max_replicas}")
    if num_gpus is None:
        num_gpus = 1 if str(load_options.get("device", "cpu")).startswith("cuda") else 0
    scaling = (
        {"num_replicas": replicas}
        if max_replicas is None
        else {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": settings.max_batch,
            }
        }
    )
    settings_fields = dataclasses.asdict(settings)

    @serve.deployment(
        name=DEPLOYMENT_NAME,
        ray_actor_options={"num_gpus": num_gpus},
        max_ongoing_requests=settings.max_queue + settings.max_batch,
        **scaling,
    )
    @serve.ingress()
    class SDRuntime:
        def __init__(self, models, load_options, settings_fields):
            import runtime
            from runtime.serve.settings import ServeSettings

            self.settings = ServeSettings(**settings_fields)
            self.pipelines = {name: runtime.load(path, **load_options) for name, path in models.items()}

        def __serve_build_asgi_app__(self):
            from runtime.serve.app import create_app

            return create_app(self.pipelines, self.settings)

    return SDRuntime.bind(models, load_options, settings_fields)


def run(models, load_options, settings, *, replicas=1, max_replicas=None, num_gpus=None) -> None:
    """Start (or join) Ray, deploy, and serve on settings.host:port until interrupted."""
    import time

    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(
        deployment(models, load_options, settings, replicas=replicas, max_replicas=max_replicas, num_gpus=num_gpus),
        name=DEPLOYMENT_NAME,
        route_prefix="/",
    )
    print(f"serving on http://{settings.host}:{settings.port} through Ray Serve ({replicas} replica(s)); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
