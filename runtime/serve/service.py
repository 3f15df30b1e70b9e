"""What both APIs share: the models by name, one Batcher each, and one request's path through them
(validated params -> queue -> images or an HTTP error), plus PNG encoding with the CLI's metadata."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import PIL.Image

from runtime import images as imageio
from runtime.serve import extra_networks
from runtime.serve.batching import Batcher, Cancelled, Job, QueueFull
from runtime.serve.fields import FieldError
from runtime.serve.metrics import Metrics
from runtime.serve.params import GenerationParams, batch_key, batch_runner
from runtime.serve.settings import ServeSettings

_DISCONNECT_POLL_S = 0.1  # how often a waiting handler checks whether its client is still there


class HTTPError(Exception):
    """An answer other than 200: status, a message, the field it concerns (if any), extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


@dataclass
class Model:
    name: str
    pipeline: object
    batcher: Batcher
    hash: str | None  # A1111's short model hash, as the PNG metadata has it


class Service:
    def __init__(self, pipelines_by_name: Mapping[str, object], settings: ServeSettings):
        if not pipelines_by_name:
            raise ValueError("serve needs at least one model")
        self.settings = settings
        self.metrics = Metrics()
        self.models: dict[str, Model] = {}
        for name, pipe in pipelines_by_name.items():
            batcher = Batcher(
                batch_runner(pipe),
                max_batch=settings.max_batch,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                steps_of=_denoising_steps,
                observer=self.metrics.for_model(name),
                name=name,
            )
            self.models[name] = Model(name, pipe, batcher, _model_hash(pipe))
        self.default_model = next(iter(self.models))

    def model(self, name: str | None, field: str = "model") -> Model:
        """A configured model by name (None: the default); never a path from the client."""
        if name is None or name == "":
            return self.models[self.default_model]
        if not isinstance(name, str) or name not in self.models:
            raise FieldError(field, f"unknown model {str(name)[:80]!r}; this server has: {', '.join(self.models)}")
        return self.models[name]

    def close(self) -> None:
        for model in self.models.values():
            model.batcher.close()

    async def run(self, model: Model, params: Sequence[GenerationParams], is_disconnected) -> list[list]:
        """Queue `params` (all or none), wait for their images; cancel them if the client goes away or
        the request times out. `is_disconnected`: the request's async disconnect check."""
        pipe = model.pipeline
        for p in params:
            extra_networks.check_prompt(pipe, p.prompt)
        try:
            jobs = [Job(p, batch_key(pipe, p), p.num_images) for p in params]
        except (ValueError, TypeError) as err:  # the pipeline's own checks, past ours
            raise HTTPError(400, " ".join(str(err).split())) from None
        try:
            model.batcher.submit(jobs)
        except QueueFull as err:
            retry = str(self.settings.retry_after_s)
            raise HTTPError(429, f"the server is busy: {err}; retry later", headers={"Retry-After": retry}) from None
        waiting = [asyncio.wrap_future(job.future) for job in jobs]
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            while not all(future.done() for future in waiting):
                await asyncio.wait(waiting, timeout=_DISCONNECT_POLL_S, return_when=asyncio.ALL_COMPLETED)
                if all(future.done() for future in waiting):
                    break
                if await is_disconnected():
                    self._cancel(jobs, "disconnected")
                    raise HTTPError(499, "the client disconnected")
                if time.monotonic() > deadline:
                    self._cancel(jobs, "timeout")
                    raise HTTPError(
                        504, f"the request took longer than the server's {self.settings.request_timeout_s:g} s"
                    )
            return [future.result() for future in waiting]
        except Cancelled as err:
            raise HTTPError(409 if err.reason == "interrupted" else 503, str(err)) from None
        except (ValueError, TypeError) as err:  # the pipeline refused a value our checks let through
            raise HTTPError(400, " ".join(str(err).split())) from None
        except HTTPError:
            raise
        except Exception as err:
            message = " ".join(str(err).split())[:300]
            raise HTTPError(500, f"generation failed: {type(err).__name__}: {message}") from None
        finally:
            for future in waiting:  # a cancelled job's error may arrive after we stopped listening
                future.add_done_callback(_read_error)

    def _cancel(self, jobs, reason: str) -> None:
        for job in jobs:
            if not job.future.done():
                job.cancel(reason)
                self.metrics.cancelled.labels(reason).inc()


def _read_error(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _denoising_steps(params: GenerationParams) -> int:
    if params.image is None:
        return params.steps
    strength = params.strength if params.strength is not None else (1.0 if params.mask is not None else 0.75)
    return max(1, int(params.steps * strength))


def _model_hash(pipe) -> str | None:
    source = getattr(getattr(pipe, "components", None), "source", None)
    if not source:
        return None
    from runtime.model_hash import model_hash

    return model_hash(source)


def png_bytes(image: PIL.Image.Image) -> bytes:
    """The image as PNG with the text chunks the CLI writes (its `info`'s string entries)."""
    chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=imageio.png_text_info(chunks))
    return buffer.getvalue()


def png_base64(image: PIL.Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")
