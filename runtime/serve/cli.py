"""`python -m runtime serve`: its arguments and its main. Only the standard library at import time, so
`python -m runtime --help` stays fast; torch, fastapi, uvicorn and ray load when the server starts."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from runtime import cli_choices

API_KEY_ENV = "SD_RUNTIME_API_KEY"  # read when --api-key is not given: argv is visible to every local user


def add_parser(commands, formatter_class) -> argparse.ArgumentParser:
    from runtime.serve.settings import ServeSettings

    defaults = ServeSettings()
    serve = commands.add_parser(
        "serve", help="HTTP server: OpenAI Images API and A1111 /sdapi/v1", formatter_class=formatter_class
    )
    serve.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a model to serve (repeat for more); clients pick it by NAME (default: the path's stem); the first "
        "is the default",
    )
    serve.add_argument("--host", default=defaults.host, help="address to bind; 0.0.0.0 opens it to the network")
    serve.add_argument("--port", type=int, default=defaults.port)
    serve.add_argument("--api-key", default=None, help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV})")
    serve.add_argument("--backend", default="torch", help=f"one of {', '.join(cli_choices.backends())}")
    serve.add_argument("--engine-dir", default=None, help="exported graphs for the onnxruntime / tensorrt backends")
    serve.add_argument("--lora-dir", default=None, help="the folder <lora:NAME:0.8> in prompts names files in")
    serve.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings used by name in prompts")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="fp32", help=f"one of {', '.join(cli_choices.dtypes())}")
    for name, help_text in (
        ("max_images", "images per request (n; batch_size x n_iter)"),
        ("max_steps", "denoising steps per request"),
        ("max_pixels", "pixels per image (width x height)"),
        ("max_upload_bytes", "bytes per uploaded image"),
        ("max_queue", "queued requests per model before 429"),
        ("max_batch", "images in one denoising loop"),
    ):
        serve.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name), help=help_text)
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, help="how long a batch waits to fill")
    serve.add_argument(
        "--timeout", type=float, default=defaults.request_timeout_s, help="seconds per request (queue + run)"
    )
    serve.add_argument("--ray", action="store_true", help="serve through Ray Serve (ray_app.py), one replica per GPU")
    serve.add_argument("--replicas", type=int, default=1, help="--ray: replicas (the minimum with --max-replicas)")
    serve.add_argument("--max-replicas", type=int, default=None, help="--ray: autoscale up to this many replicas")
    serve.add_argument("--num-gpus", type=float, default=None, help="--ray: GPUs per replica (default: 1 on cuda)")
    return serve


def models_by_name(values: list[str]) -> dict[str, str]:
    """{name: path} from NAME=PATH / PATH arguments; names are what clients send, paths stay here."""
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not re.fullmatch(r"[\w.\-]+", name):
            name, path = Path(value).stem, value
        if not Path(path).exists():
            raise ValueError(f"--model path not found: {path}")
        if name in models:
            raise ValueError(f"--model name {name!r} is given twice; name them apart with NAME=PATH")
        models[name] = path
    return models


def settings_from(args):
    from runtime.serve.settings import ServeSettings

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    return ServeSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_pixels=args.max_pixels,
        max_upload_bytes=args.max_upload_bytes,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        request_timeout_s=args.timeout,
    )


def load_options(args) -> dict:
    if args.backend not in cli_choices.backends():
        raise ValueError(f"unknown backend {args.backend!r}; choose one of {', '.join(cli_choices.backends())}")
    options = dict(backend=args.backend, device=args.device, dtype=args.dtype)
    if args.engine_dir is not None:
        options["engine_dir"] = args.engine_dir
    for flag, key in (("--lora-dir", "lora_dir"), ("--embeddings-dir", "embeddings_dir")):
        folder = getattr(args, key)
        if folder is not None:
            if not Path(folder).is_dir():
                raise ValueError(f"{flag} is not a folder: {folder}")
            options[key] = folder
    return options


def run(args) -> int:
    """Check everything, load the models, serve until interrupted."""
    models = models_by_name(args.model)
    settings = settings_from(args)
    options = load_options(args)
    if args.ray:
        from runtime.serve import ray_app

        ray_app.run(
            models, options, settings, replicas=args.replicas, max_replicas=args.max_replicas, num_gpus=args.num_gpus
        )
        return 0
    import uvicorn

    import runtime
    from runtime.serve.app import create_app

    pipelines = {name: runtime.load(path, **options) for name, path in models.items()}
    uvicorn.run(create_app(pipelines, settings), host=settings.host, port=settings.port, log_level="info")
    return 0
