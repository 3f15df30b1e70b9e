"""A validated generation request, in the pipeline's terms, and how the worker runs a batch of them.

Both HTTP APIs turn their fields into `GenerationParams` (the fields of runtime.pipeline's
GenerationRequest) before anything is queued. The worker hands a batch to `Pipeline.generate_batch`
when the pipeline has it; otherwise each request runs alone through generate / img2img / inpaint and
no two requests share a batch key (so nothing is grouped that would not share a loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import PIL.Image


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

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else "img2img" if self.mask is None else "inpaint"

    def as_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _has_batching(pipe) -> bool:
    return callable(getattr(pipe, "generate_batch", None))


def batch_key(pipe, params: GenerationParams):
    """Equal keys may share one denoising loop (the pipeline decides); without generate_batch every
    request is its own key."""
    if _has_batching(pipe):
        from runtime.pipeline import GenerationRequest

        return GenerationRequest(**params.as_fields()).batch_key(pipe)
    return object()


def run_alone(pipe, params: GenerationParams, callback=None) -> list[PIL.Image.Image]:
    """The request through the pipeline's own single-request call: what a batched run must equal."""
    options = dict(
        negative_prompt=params.negative_prompt,
        steps=params.steps,
        guidance=params.guidance,
        width=params.width,
        height=params.height,
        seed=params.seed,
        num_images=params.num_images,
        scheduler=params.scheduler,
        callback=callback,
        progress=False,
    )
    if params.strength is not None:
        options["strength"] = params.strength
    if params.mask is not None:
        return pipe.inpaint(params.image, params.mask, params.prompt, **options)
    if params.image is not None:
        return pipe.img2img(params.image, params.prompt, **options)
    return pipe.generate(params.prompt, **options)


def batch_runner(pipe):
    """The Batcher's run_batch for `pipe`: (params list, step callback) -> images per request."""

    def run_batch(batch, callback):
        if _has_batching(pipe):
            from runtime.pipeline import GenerationRequest

            requests = [GenerationRequest(**params.as_fields()) for params in batch]
            return pipe.generate_batch(requests, progress=False, callback=callback)
        return [run_alone(pipe, params, callback) for params in batch]

    return run_batch
