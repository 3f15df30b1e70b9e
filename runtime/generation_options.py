"""What one generation asks for, checked once against a pipeline before any network runs.

    GenerationRequest   the caller's words: prompt, steps, guidance, sizes, seed, ... (defaults unresolved)
    CheckedRequest      the same with every default resolved and every value validated (internal)
    BatchKey            what requests must share to run through one denoising loop (generate_batch)

Pipeline.generate / img2img / inpaint build a GenerationRequest from their keywords, and
Pipeline.generate_batch takes a list of them; all go through `check_request` here, so each value has
one rule and one wording. The scheduler's own rules (steps, strength) are runtime.schedulers', called
from here. This module reads the pipeline it is given (sizes, dtype, scheduler config, conditioner) but
does not import runtime.pipeline.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from runtime import conditioning, embeddings, prompt_loras, validation
from runtime import images as imageio
from runtime.graphs import scheduler_identity
from runtime.prompt_syntax import chunk_count
from runtime.schedulers import SCHEDULER_NAMES, check_steps, img2img_start_index, make_scheduler

# Strength when the caller gives none (diffusers' pipelines' defaults for our generate API).
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}


@dataclass(frozen=True, init=False)
class GenerationRequest:
    """One generation, in the words of Pipeline.generate / img2img / inpaint. The mode follows from the
    inputs: txt2img, img2img with `image`, inpainting with `image` and `mask`."""

    prompt: str | list[str]  # a list gives each prompt's num_images images, together
    negative_prompt: str | list[str] | None = None  # None: none (SDXL: zeros, force_zeros_for_empty_prompt)
    steps: int = 30
    guidance: float = 7.5  # classifier-free guidance scale; <= 1 turns guidance off
    width: int | None = None  # None: the model's native size (img2img / inpaint: the image's own)
    height: int | None = None
    seed: int | None = None  # in [0, 2**32); None: a random one, recorded in the PNG metadata
    num_images: int = 1  # per prompt
    scheduler: str | None = None  # a runtime.schedulers name; None: the checkpoint's own
    image: Any = None  # PIL image or path: img2img (with `mask`: inpainting)
    mask: Any = None  # PIL image or path, white = repaint
    strength: float | None = None  # img2img / inpaint; None: 0.75 / 1.0
    micro: dict = field(default_factory=dict)  # SDXL micro-conditioning (conditioning.MicroConditioning)

    def __init__(
        self,
        prompt,
        *,
        negative_prompt=None,
        steps: int = 30,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        image=None,
        mask=None,
        strength: float | None = None,
        **micro,
    ):
        values = dict(locals())
        for name in ("self", "micro", "__class__"):
            values.pop(name, None)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "micro", dict(micro))

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "txt2img" if self.image is None else "img2img"

    def batch_key(self, pipe) -> BatchKey:
        """What this request must share with others to be denoised in one batch on `pipe` (validates it)."""
        return check_request(pipe, self).batch_key


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys run through one denoising loop. Prompts, negatives, seeds, guidance
    scales, image counts and SDXL micro-conditioning may differ per request: each becomes rows."""

    mode: str
    width: int
    height: int
    steps: int
    scheduler: str  # the sampler that will run: class and full config (graphs.scheduler_identity)
    strength: float | None  # img2img / inpaint: where denoising starts
    guided: bool  # guidance > 1: the UNet runs on [uncond; cond]
    context_tokens: int  # the text context's length: A1111 prompts over 75 tokens take more 77-token chunks
    prompt_loras: tuple  # ((name, weight), ...) of the prompts' <lora:...> tags: they apply to the whole batch

    def differences(self, other: BatchKey) -> list[str]:
        return [name for name in self.__dataclass_fields__ if getattr(self, name) != getattr(other, name)]


@dataclass(frozen=True)
class CheckedRequest:
    """One validated request: everything decided before any network runs."""

    mode: str
    prompts: list[str]
    negatives: list[str]
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    num_images: int
    scheduler: str | None  # the caller's choice; None: the checkpoint's own scheduler
    scheduler_name: str  # what ran, for metadata
    strength: float | None
    batch_key: BatchKey
    image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None
    micro: conditioning.MicroConditioning | None = None  # SDXL only
    zero_negatives: bool = False  # SDXL: no negative prompt given, force_zeros_for_empty_prompt applies

    @property
    def rows(self) -> int:
        """Latent rows (images) this request adds to a batch."""
        return len(self.prompts) * self.num_images

    @property
    def guided(self) -> bool:
        return self.guidance > 1


def check_request(pipe, request: GenerationRequest) -> CheckedRequest:
    """`request` validated against `pipe`, every default resolved; errors name the field."""
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"a request must be a runtime.GenerationRequest, got {type(request).__name__}")
    mode = request.mode
    if request.mask is not None and request.image is None:
        raise ValueError("mask needs image (the image to inpaint)")
    if mode == "txt2img" and request.strength is not None:
        raise ValueError("strength is for img2img and inpainting: give an image")
    refining = sorted({"refiner", "refiner_start"} & set(request.micro))
    if refining:
        raise ValueError(f"{refining[0]}: a GenerationRequest has no refiner; call generate(..., refiner=) for that")
    kind = getattr(pipe.components, "kind", "sd1")
    micro = conditioning.MicroConditioning.from_kwargs(request.micro, kind)
    width, height, image, mask = request.width, request.height, None, None
    if mode == "img2img":
        image = imageio.load_image(request.image, "init image")
        width, height = size_for_image(pipe, image, width, height)
    elif mode == "inpaint":
        image, mask = inpaint_inputs(pipe, request.image, request.mask)
        width, height = size_for_image(pipe, image, width, height)
    strength = request.strength
    if strength is None and mode != "txt2img":
        strength = DEFAULT_STRENGTH[mode]
    prompts, negatives = _prompts(request.prompt, request.negative_prompt)
    steps, num_images, guidance = request.steps, request.num_images, request.guidance
    scheduler = _scheduler(pipe, request.scheduler)
    check_steps(steps, scheduler.config["num_train_timesteps"])
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    validation.check_batch(len(prompts), num_images)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance < math.inf:
        raise ValueError(f"guidance must be a finite number >= 0 (<= 1 turns guidance off), got {guidance!r}")
    if guidance <= 1 and request.negative_prompt:
        warnings.warn(
            f"guidance {guidance} <= 1 turns classifier-free guidance off: the negative prompt is ignored",
            stacklevel=4,
        )
    width, height = _size(pipe, width, height)
    validation.check_pixels(
        width, height, len(prompts) * num_images, guidance > 1, torch.finfo(pipe.dtype).bits // 8, pipe.max_pixels
    )
    if strength is not None:
        img2img_start_index(strength, steps)
    seed = secrets.randbelow(validation.SEED_LIMIT) if request.seed is None else request.seed
    validation.check_seed(seed)
    guided = guidance > 1
    key = BatchKey(
        mode=mode,
        width=width,
        height=height,
        steps=steps,
        scheduler=scheduler_identity(scheduler),
        strength=strength,
        guided=guided,
        context_tokens=_context_tokens(pipe, prompts + (negatives if guided else [])),
        prompt_loras=_prompt_loras(pipe, prompts),
    )
    return CheckedRequest(
        mode=mode,
        prompts=prompts,
        negatives=negatives,
        steps=steps,
        guidance=float(guidance),
        width=width,
        height=height,
        seed=seed,
        num_images=num_images,
        scheduler=request.scheduler,
        scheduler_name=request.scheduler or pipe.default_scheduler_name(),
        strength=strength,
        batch_key=key,
        image=image,
        mask=mask,
        micro=micro if pipe.conditioner is not None else None,
        zero_negatives=request.negative_prompt is None,
    )


def check_batch(pipe, requests) -> list[CheckedRequest]:
    """Every request validated (an error names its index), then their batch keys compared."""
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError(f"generate_batch takes a non-empty list of GenerationRequest, got {requests!r:.80}")
    checked = []
    for index, request in enumerate(requests):
        try:
            checked.append(check_request(pipe, request))
        except (ValueError, TypeError) as err:
            raise type(err)(f"request {index}: {err}") from None
    first = checked[0].batch_key
    for index, request in enumerate(checked[1:], start=1):
        differing = first.differences(request.batch_key)
        if differing:
            details = ", ".join(
                f"{name} {getattr(request.batch_key, name)!r:.60} vs {getattr(first, name)!r:.60}" for name in differing
            )
            raise ValueError(
                f"request {index} cannot share a denoising loop with request 0: {details}; "
                f"group requests by GenerationRequest.batch_key(pipe)"
            )
    total = sum(request.rows for request in checked)
    if total > validation.MAX_IMAGES_PER_CALL:
        raise ValueError(
            f"the batch holds {total} images; at most {validation.MAX_IMAGES_PER_CALL} per call (split the batch)"
        )
    return checked


def inpaint_inputs(pipe, image, mask) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    image = imageio.load_image(image, "init image")
    mask = imageio.load_image(mask, "mask")
    if mask.size != image.size:
        raise ValueError(
            f"mask size {mask.size[0]}x{mask.size[1]} differs from the image size "
            f"{image.size[0]}x{image.size[1]}; give a mask of the same size"
        )
    if pipe.unet.config.in_channels not in (4, 9):
        raise ValueError(
            f"inpainting needs a UNet with 4 or 9 input channels, this one has "
            f"in_channels={pipe.unet.config.in_channels}"
        )
    return image, mask


def size_for_image(pipe, image, width, height) -> tuple[int, int]:
    """The output size for an init image: the given one, else the image's rounded down to the VAE factor."""
    if width is not None and height is not None:
        return width, height
    factor = pipe.vae_scale_factor
    image_width, image_height = image.size
    rounded = (image_width - image_width % factor, image_height - image_height % factor)
    if rounded[0] < factor or rounded[1] < factor:
        raise ValueError(f"init image is {image_width}x{image_height}; it must be at least {factor}x{factor}")
    if rounded != image.size:
        warnings.warn(
            f"init image size {image_width}x{image_height} is not a multiple of {factor}; "
            f"it is resized to {rounded[0]}x{rounded[1]}",
            stacklevel=4,
        )
    return (width if width is not None else rounded[0]), (height if height is not None else rounded[1])


def _prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = _prompt_list(prompt, "prompt")
    validation.check_prompt_text(prompts, "prompt")
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    if isinstance(negative_prompt, str):
        validation.check_prompt_text([negative_prompt], "negative_prompt")
        return prompts, [negative_prompt] * len(prompts)
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    validation.check_prompt_text(negatives, "negative_prompt")
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
    return prompts, negatives


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


def _scheduler(pipe, name):
    if name is not None and name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return make_scheduler(name, pipe.scheduler_config)


def _size(pipe, width, height) -> tuple[int, int]:
    default_width, default_height = pipe.native_size()
    width = default_width if width is None else width
    height = default_height if height is None else height
    factor = pipe.vae_scale_factor
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < factor or value % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE factor), got {value!r}")
    return width, height


def _context_tokens(pipe, texts: list[str]) -> int:
    """Tokens in the context these texts encode to: one window, or A1111's 77-token chunks (the longest
    text decides, since one call pads every text to the same chunk count; SDXL: over both encoders)."""
    texts = prompt_loras.without_tags(texts)
    library = embeddings.library(pipe.embeddings_dir)  # a multi-vector embedding takes several token slots
    if pipe.conditioner is not None:  # an SDXL refiner has only its second tokenizer
        window = pipe.conditioner.encoders[0][0].max_length
        if pipe.prompt_syntax != "a1111":
            return window
        return window * pipe.conditioner.chunk_count(texts, pipe.conditioner.matchers(library))
    window = pipe.tokenizer.max_length
    if pipe.prompt_syntax != "a1111":
        return window
    matcher = None if library is None else library.matcher(pipe.tokenizer)
    return window * chunk_count(pipe.tokenizer, texts, matcher)


def _prompt_loras(pipe, prompts: list[str]) -> tuple:
    """((name, weight), ...) of the <lora:...> tags the request's prompts name, each resolved in
    pipe.lora_dir now (an unknown name, or prompts that disagree, is refused before any network runs)."""
    return tuple((tag.name, tag.scale) for tag, _ in prompt_loras.call_loras(prompts, pipe.lora_dir))
