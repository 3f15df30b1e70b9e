"""Code written for diffusers, run on our pipeline: `pipe(prompt, num_inference_steps=..., ...)` and `pipe.to()`.

    result = pipe("a fox", num_inference_steps=30, guidance_scale=7.5, generator=torch.Generator().manual_seed(1))
    result.images[0]

A thin adapter onto Pipeline.generate / img2img / inpaint's run (one GenerationRequest): `image=` makes
it img2img, `image=` with `mask_image=` inpainting, as diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline;
the defaults are those pipelines' (50 steps, guidance 7.5, img2img strength 0.8 at the image's size,
inpaint strength 1.0 at the model's native size). Our generate(...) API stays as it
is; this maps diffusers' names onto it and gives diffusers' image for the same arguments.

Differences: `generator` must be one CPU torch.Generator (the runtime draws on the CPU, as diffusers does
with a CPU generator); `latents=` is for txt2img; `clip_skip` (layers skipped from the end: 1 is A1111's
"Clip skip: 2") applies to the prompt only, as in diffusers, whose negative prompt uses the last layer;
prompts are read with `pipe.prompt_syntax` (A1111 syntax by default; for prompts without it, within 75
tokens, diffusers' exact encoding); the images' metadata records the generator's initial seed.
Unknown keywords raise TypeError, as diffusers' call does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime import prompt_loras
from runtime.caller_inputs import CallerInputs
from runtime.generation_options import GenerationRequest, check_request, inpaint_inputs, size_for_image

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_EMBEDS_LABEL = "<prompt_embeds>"  # the prompt written into metadata when embeddings were given


@dataclass
class PipelineOutput:
    """diffusers' StableDiffusionPipelineOutput: `.images` (list of PIL, np [B, H, W, 3], torch [B, 3, H, W]
    in [0, 1], or latents), and `nsfw_content_detected` (None: there is no safety checker)."""

    images: Any
    nsfw_content_detected: list[bool] | None = None

    def __getitem__(self, index):
        return (self.images, self.nsfw_content_detected)[index]


def diffusers_call(
    pipe,
    prompt=None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt=None,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    output_type: str = "pil",
    return_dict: bool = True,
    clip_skip: int | None = None,
    image=None,
    mask_image=None,
    strength: float | None = None,
    scheduler: str | None = None,
    progress: bool = True,
):
    """Pipeline.__call__. `scheduler` (one of runtime.schedulers' names) and `progress` are ours."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    mode = "inpaint" if mask_image is not None else "img2img" if image is not None else "txt2img"
    if mask_image is not None and image is None:
        raise ValueError("mask_image= needs image= (the image to inpaint)")
    if strength is not None and mode == "txt2img":
        raise ValueError("strength= is for img2img and inpainting: pass image=")
    if latents is not None and mode != "txt2img":
        raise ValueError("latents= is supported for txt2img only (without image=)")
    generator = _check_generator(generator)
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt= and prompt_embeds=")
    if prompt_embeds is not None:
        prompts = [_EMBEDS_LABEL] * prompt_embeds.shape[0]
    else:
        prompts = prompt
    if negative_prompt_embeds is not None:
        negative_prompt = [_EMBEDS_LABEL] * len(prompts)
    seed = None if generator is None else generator.initial_seed()
    if mode == "inpaint":
        image, mask_image = inpaint_inputs(pipe, image, mask_image)
        # diffusers' inpainting pipeline renders at the model's native size unless told (its img2img
        # pipeline, at the image's size).
        native_width, native_height = pipe.native_size()
        width, height = width or native_width, height or native_height
    if mode != "txt2img":
        from runtime import images as imageio

        image = imageio.load_image(image, "image")
        width, height = size_for_image(pipe, image, width, height)
        strength = (1.0 if mode == "inpaint" else 0.8) if strength is None else strength
    if latents is not None and height is None and width is None:
        height, width = (size * pipe.vae_scale_factor for size in latents.shape[-2:])
    request = check_request(
        pipe,
        GenerationRequest(
            prompts,
            negative_prompt=negative_prompt,
            steps=num_inference_steps,
            guidance=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            num_images=num_images_per_prompt,
            scheduler=scheduler,
            image=image,
            mask=mask_image,
            strength=strength,
        ),
    )
    context = None
    if prompt_embeds is not None or negative_prompt_embeds is not None or clip_skip:
        # The prompt's <lora:...> tags reach the text encoder here too (the run applies them again).
        loras = prompt_loras.applied(pipe._lora_set, request.prompts, pipe.lora_dir)
        with pipe._run_lock, loras, torch.inference_mode():
            context = _context(pipe, request, prompt_embeds, negative_prompt_embeds, clip_skip)
    if latents is not None:
        _check_latents(pipe, request, latents)
    output = {"pil": "pil", "latent": "latent"}.get(output_type, "tensor")
    inputs = CallerInputs(generator=generator, latents=latents, context=context, output=output)
    result = pipe._run([request], progress=progress, inputs=inputs)
    if output == "pil":
        result = result[0]
    if output_type == "np":
        result = result.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return PipelineOutput(result) if return_dict else (result, None)


def _check_generator(generator):
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        raise ValueError("generator= must be one torch.Generator; a list (one per image) is not supported")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator= must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator= must be a CPU torch.Generator (the runtime draws noise on the CPU, as "
            f"diffusers does with a CPU generator), got one on {generator.device}"
        )
    return generator


def _context(pipe, request, prompt_embeds, negative_prompt_embeds, clip_skip) -> torch.Tensor:
    """[uncond; cond] (or cond unguided) from the given embeddings, encoding whichever half is text."""
    guided = request.guidance > 1
    if prompt_embeds is None:
        prompt_embeds = pipe.encode_prompt(request.prompts, None, 1.0, clip_skip=clip_skip)
    prompt_embeds = _checked_embeds(pipe, prompt_embeds, "prompt_embeds", len(request.prompts))
    parts = [prompt_embeds]
    if guided:
        if negative_prompt_embeds is None:
            # diffusers applies clip_skip to the prompt only: its negative comes from the last layer.
            negative_prompt_embeds = pipe.encode_prompt(request.negatives, None, 1.0)
        negative_prompt_embeds = _checked_embeds(
            pipe, negative_prompt_embeds, "negative_prompt_embeds", len(request.prompts)
        )
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                f"{tuple(prompt_embeds.shape)} must have the same shape"
            )
        parts.insert(0, negative_prompt_embeds)
    return torch.cat(parts).repeat_interleave(request.num_images, dim=0)


def _checked_embeds(pipe, embeds, name: str, rows: int) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
        raise ValueError(
            f"{name} must be a tensor [batch, tokens, channels], got "
            f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}"
        )
    channels = pipe.unet.config.cross_attention_dim
    if embeds.shape[0] != rows or embeds.shape[2] != channels:
        raise ValueError(f"{name} has shape {tuple(embeds.shape)}; expected [{rows}, tokens, {channels}]")
    return embeds.to(pipe.device, pipe.dtype)


def _check_latents(pipe, request, latents) -> None:
    expected = (
        len(request.prompts) * request.num_images,
        pipe.vae.config.latent_channels,
        request.height // pipe.vae_scale_factor,
        request.width // pipe.vae_scale_factor,
    )
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
        found = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"latents must be a tensor of shape {expected} (batch, channels, height/8, width/8), got {found}"
        )


def move_pipeline(pipe, *args, device=None, dtype=None, torch_device=None, torch_dtype=None):
    """Pipeline.to: move the torch networks to a device and/or dtype, in place; return the pipeline.

    Positional arguments may be a device ("cuda", torch.device) or a dtype (torch.float16, "fp16") in
    either order. The exported backends run graphs fixed at export and refuse; the triton backend
    needs CUDA (or the interpreter) like runtime.load; a pipeline replaying CUDA graphs stays on CUDA.
    """
    import os

    from runtime.dtypes import DTYPES
    from runtime.weights import resolve_device, resolve_dtype

    device, dtype = device or torch_device, dtype or torch_dtype
    for value in args:
        is_dtype_name = isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPES
        if isinstance(value, torch.dtype) or is_dtype_name:
            dtype = value
        else:
            device = value
    new_device = pipe.device if device is None else resolve_device(device)
    new_dtype = pipe.dtype if dtype is None else resolve_dtype(dtype)
    if (new_device, new_dtype) == (pipe.device, pipe.dtype):
        return pipe
    if pipe.backend not in ("torch", "triton"):
        raise ValueError(
            f"the {pipe.backend} backend runs graphs exported for {pipe.device} / {pipe.dtype} and "
            f"cannot move; load the model again with the device and dtype you want"
        )
    if pipe.backend == "triton" and new_device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton backend runs on CUDA (or under TRITON_INTERPRET=1); cannot move to {new_device}")
    if pipe.graphs is not None and new_device.type != "cuda":
        raise ValueError(
            f"this pipeline replays CUDA graphs; it cannot move to {new_device} "
            f"(load it with cuda_graphs=False to move it freely)"
        )
    with pipe._run_lock:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # a refiner has no text_encoder
            network = getattr(pipe.components, name, None)
            if network is not None:
                network.to(device=new_device, dtype=new_dtype)
        parameter = next(pipe.unet.parameters())
        pipe.device, pipe.dtype = parameter.device, parameter.dtype
    return pipe
