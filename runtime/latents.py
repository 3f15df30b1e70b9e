"""The latents a run starts from, per mode, and the state one denoising loop carries (DenoiseRun).

Random draws reproduce diffusers' for the same seed, in diffusers' order, from one request's CPU generator:
  txt2img:  initial noise                                                  then per-step noise
  img2img:  VAE posterior sample of the image, noise for add_noise        then per-step noise
  inpaint:  [VAE sample of the image (4-channel UNet, or strength < 1)], initial noise,
            VAE sample of the masked image                                 then per-step noise
Per-step (ancestral) noise comes from `scheduler.draw_noise` up front, after those draws: rows [S, ...]
indexed by step; for img2img the scheduler draws only from its begin index (set by img2img_start) on.
A batch of requests (Pipeline.generate_batch) prepares each request with its own generator, in this
order, and concatenates the rows: each request's images are those it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime import images as imageio


@dataclass
class LatentBlend:
    """4-channel inpainting: after each step, the unmasked region is reset to the image's latents
    noised to the next step's level (diffusers' StableDiffusionInpaintPipeline for 4-channel UNets)."""

    image_latents: torch.Tensor  # [B, 4, h, w], scaled
    mask: torch.Tensor  # [B, 1, h, w], 1 = repaint
    noise: torch.Tensor  # the initial noise, reused to noise the image at each level


@dataclass
class StartLatents:
    """What one request contributes to a run before the first step."""

    latents: torch.Tensor  # [rows, 4, h, w]
    conditioning: torch.Tensor | None = None  # 9-channel inpainting: [rows, 5, h, w] (mask, masked image)
    blend: LatentBlend | None = None  # 4-channel inpainting


@dataclass
class DenoiseRun:
    """Everything one denoising loop reads besides the latents; built by a run, passed to each stage
    (Pipeline.denoise, its between-step work), never kept on the pipeline."""

    scheduler: object  # set up for this run: timesteps and begin index
    context: torch.Tensor  # [uncond; cond] text context (or cond alone, unguided)
    guidance: float | torch.Tensor  # one scale, or [B] fp32: one per latent row (requests with their own)
    start: int = 0  # first step index (img2img / inpaint strength, a refiner's begin)
    end: int | None = None  # one past the last step (None: all; an SDXL base stopping for its refiner)
    noise: torch.Tensor | None = None  # ancestral noise [S, B, ...] from scheduler.draw_noise
    conditioning: torch.Tensor | None = None  # 9-channel inpainting's extra UNet channels, guided order
    added: dict[str, torch.Tensor] | None = None  # SDXL's text_embeds / time_ids, guided order
    blend: LatentBlend | None = None
    callback: object = None  # callback(step_index, timestep, latents) -> False cancels
    progress: bool = True


def start_latents(pipe, scheduler, request, start: int, shape, generator, given=None) -> StartLatents:
    """One request's starting latents on `pipe`, drawn from `generator` in diffusers' order (module
    docstring). `given`: txt2img latents the caller supplied (diffusers' latents=), before init_noise_sigma."""
    if request.mode == "txt2img":
        initial = given.to(pipe.device, pipe.dtype) if given is not None else pipe._randn(shape, generator)
        return StartLatents(initial * scheduler.init_noise_sigma)
    pixels = imageio.image_to_tensor(request.image, request.width, request.height)
    if request.mode == "img2img":
        image_latents = pipe._encode_image(pixels, generator).expand(shape[0], -1, -1, -1)
        return StartLatents(scheduler.add_noise(image_latents, pipe._randn(shape, generator), start))
    return _inpaint(pipe, scheduler, request, pixels, start, shape, generator)


def _inpaint(pipe, scheduler, request, pixels, start, shape, generator) -> StartLatents:
    mask_pixels = imageio.mask_to_tensor(request.mask, request.width, request.height)
    four_channel = pipe.unet.config.in_channels == 4
    full_strength = request.strength == 1.0
    image_latents = None
    if four_channel or not full_strength:
        image_latents = pipe._encode_image(pixels, generator).expand(shape[0], -1, -1, -1)
    noise = pipe._randn(shape, generator)
    if full_strength:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, start)
    latent_mask = F.interpolate(mask_pixels, size=shape[-2:]).to(pipe.device, pipe.dtype)
    latent_mask = latent_mask.expand(shape[0], -1, -1, -1)
    if four_channel:
        # diffusers samples the masked image's latents here even for 4-channel UNets (and never uses
        # them): make the same draw, skipping the encode, so later draws stay aligned.
        pipe._randn((1, *shape[1:]), generator)
        return StartLatents(latents, blend=LatentBlend(image_latents, latent_mask, noise))
    masked_latents = pipe._encode_image(pixels * (mask_pixels < 0.5), generator)
    return StartLatents(latents, conditioning=torch.cat([latent_mask, masked_latents.expand(shape[0], -1, -1, -1)], 1))


def concatenated(parts: list[StartLatents], guided: bool):
    """(latents, conditioning in guided order, blend) of a batch, each request's rows in order."""
    latents = torch.cat([part.latents for part in parts])
    conditioning = None
    if parts[0].conditioning is not None:
        conditioning = torch.cat([part.conditioning for part in parts])
        if guided:
            conditioning = torch.cat([conditioning, conditioning])
    blend = None
    if parts[0].blend is not None:
        blend = LatentBlend(
            *(torch.cat([getattr(part.blend, name) for part in parts]) for name in ("image_latents", "mask", "noise"))
        )
    return latents, conditioning, blend


def guided_rows(parts: list[torch.Tensor], guided: bool) -> torch.Tensor:
    """Per-request tensors in guided-batch order ([uncond_i; cond_i] each) -> [uncond_1..n; cond_1..n]."""
    if len(parts) == 1:
        return parts[0]
    if not guided:
        return torch.cat(parts)
    halves = [part.chunk(2) for part in parts]
    return torch.cat([half[0] for half in halves] + [half[1] for half in halves])


def noise_rows(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-request ancestral noise [S, rows_i, ...] -> [S, B, ...] (None for samplers that draw none)."""
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
