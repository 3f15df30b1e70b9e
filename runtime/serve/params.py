"""A validated generation request, in the pipeline's terms, and how the worker runs a batch of them.

Both HTTP APIs turn their fields into `GenerationParams` before anything is queued; the worker hands a
batch to `Pipeline.generate_batch` as runtime.pipeline's GenerationRequests, which run through one
denoising loop when their `batch_key`s are equal (the only requests the Batcher groups).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import PIL.Image

from runtime.generation_options import GenerationRequest


@dataclass(frozen=True, eq=False)
class GenerationParams:
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    width: int
    height: int
    seed: int  # drawn by the server when the client asked for a random one, so it can be reported
    num_images: int
    scheduler: str | None  # our name (runtime.schedulers); None: the model's own
    image: PIL.Image.Image | None = None  # img2img / inpaint source
    mask: PIL.Image.Image | None = None  # inpaint: white = repaint
    strength: float | None = None  # None: the pipeline's default for the mode

    def request(self) -> GenerationRequest:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return GenerationRequest(fields.pop("prompt"), **fields)


def batch_key(pipe, params: GenerationParams):
    """Equal keys share one denoising loop; computing it also validates the request against `pipe`
    (a ValueError naming the field)."""
    return params.request().batch_key(pipe)


def batch_runner(pipe):
    """The Batcher's run_batch for `pipe`: (params list, step callback) -> images per request."""

    def run_batch(batch, callback):
        return pipe.generate_batch([params.request() for params in batch], progress=False, callback=callback)

    return run_batch
