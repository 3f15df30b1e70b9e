"""txt2img, img2img and inpainting over loaded components; numerically the diffusers pipelines.

Stages are separate methods so a benchmark can time them and a faster backend can replace one:
    encode_prompt -> prepare latents -> denoise (a loop over `_denoise_step`) -> decode_latents -> to_pil
`_denoise_step` is the unit a CUDA-graph runner swaps: it only does tensor work (no host syncs); it calls
`denoise_step(scheduler, latents, i, context, guidance, noise_i, conditioning)`, the same step with the
scheduler explicit (runtime/graphs.py's StepFn). `_after_step(i, latents, start, blend, callback)` is the
eager work between steps (inpainting blend, callback), a graph runner's `between_steps`.

Random draws reproduce diffusers' for the same seed, in diffusers' order, from one CPU generator:
  txt2img:  initial noise                                                  then per-step noise
  img2img:  VAE posterior sample of the image, noise for add_noise        then per-step noise
  inpaint:  [VAE sample of the image (4-channel UNet, or strength < 1)], initial noise,
            VAE sample of the masked image                                 then per-step noise
Per-step (ancestral) noise comes from `scheduler.draw_noise` up front, after those draws: rows [S, ...]
indexed by step; for img2img the scheduler draws only from its begin index (set by img2img_start) on.

SDXL (runtime/conditioning.py): two text encoders, and `text_embeds` / `time_ids` passed to the UNet as
added conditioning (`added`, named tensors) through every step; `generate(..., refiner=, refiner_start=)`
runs the base up to the cutoff and the refiner from there, one generator across both, as diffusers'
denoising_end / denoising_start pair of calls.

Cancelling: `callback(step_index, timestep, latents)` returning False raises `GenerationCancelled`
(holding the latents reached); no image is decoded, so a cancelled run costs no VAE time.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from runtime import conditioning, lora, validation
from runtime import images as imageio
from runtime.caller_inputs import CallerInputs
from runtime.dtypes import precision_name
from runtime.graphs import CudaGraphDenoiser
from runtime.images import GenerationInfo
from runtime.model_hash import model_hash
from runtime.prompt_syntax import encode_prompts
from runtime.schedulers import SCHEDULER_NAMES, config_name, make_scheduler


class GenerationCancelled(RuntimeError):
    """The step callback returned False. `step_index` is the last step run; `latents` the latents after it."""

    def __init__(self, step_index: int, latents: torch.Tensor):
        super().__init__(f"generation cancelled by the callback after step {step_index}")
        self.step_index = step_index
        self.latents = latents


@dataclass
class _LatentBlend:
    """4-channel inpainting: after each step, the unmasked region is reset to the image's latents
    noised to the next step's level (diffusers' StableDiffusionInpaintPipeline for 4-channel UNets)."""

    image_latents: torch.Tensor  # [B, 4, h, w], scaled
    mask: torch.Tensor  # [B, 1, h, w], 1 = repaint
    noise: torch.Tensor  # the initial noise, reused to noise the image at each level


@dataclass(frozen=True)
class _Request:
    """One validated call: everything decided before any network runs."""

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


@dataclass(frozen=True)
class _SDXLCall:
    """The SDXL-only parts of one call, validated with the request."""

    micro: conditioning.MicroConditioning
    zero_negatives: bool  # no negative prompt given: force_zeros_for_empty_prompt applies
    refiner: Pipeline | None = None
    refiner_start: float | None = None


class Pipeline:
    """Stable Diffusion over `components` (runtime.weights.Components) prepared by a backend."""

    prompt_syntax = "a1111"  # how prompts are read: runtime/prompt_syntax.py's PROMPT_SYNTAXES
    max_pixels: int | None = validation.DEFAULT_MAX_PIXELS  # per image; None: no limit

    def __init__(self, components, backend: str = "torch", cuda_graphs: bool | None = None, graph_api=None):
        """cuda_graphs: replay the denoising steps from CUDA graphs (runtime/graphs.py); default on for
        the `triton` backend on a CUDA device. graph_api: the CUDA-graph API the runner calls (torch.cuda
        when None); a test's CPU stand-in may run graphs on a CPU model."""
        self.components = components
        self.backend = backend
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.conditioner = conditioning.conditioner_for(components)  # None for SD 1.x / 2.x
        self.scheduler_config = dict(components.scheduler_config)
        self.scheduler = None  # the scheduler of the latest run, set by each call
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        parameter = next(self.unet.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if cuda_graphs is None:
            cuda_graphs = backend == "triton" and self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda" and graph_api is None:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        self.graphs = CudaGraphDenoiser(self.denoise_step, graph_api=graph_api) if cuda_graphs else None
        # One request at a time: a run keeps its scheduler on self and replays shared graph buffers.
        self._run_lock = validation.ReentryGuard()
        self._loras: lora.LoraSet | None = None  # created by the first load_lora

    # ------------------------------------------------------------------ public entry points
    def generate(
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
        callback=None,
        progress: bool = True,
        refiner: Pipeline | None = None,
        refiner_start: float | None = None,
        **micro,
    ) -> list[PIL.Image.Image]:
        """Text to image. Returns `len(prompts) * num_images` PIL images (each prompt's images together);
        each image's `info` holds the generation parameters (seed included) as PNG text entries.
        SDXL: `refiner` (another SDXL pipeline) finishes from `refiner_start` (default 0.8) of the
        denoising; `micro`: original_size, crops_coords_top_left, target_size and their negative_* forms."""
        if self.conditioner is not None and self.conditioner.is_refiner:
            raise ValueError(
                f"{self.components.source} is an SDXL refiner (requires_aesthetics_score): it cannot "
                f"generate from noise; use it as refiner= of an SDXL base's generate, or img2img"
            )
        sdxl = self._sdxl_call(negative_prompt, micro, refiner, refiner_start)
        request = self._request(
            "txt2img", prompt, negative_prompt, steps, guidance, width, height, seed, num_images, scheduler, None
        )
        return self._run(request, callback=callback, progress=progress, sdxl=sdxl)

    def img2img(
        self,
        image,
        prompt,
        *,
        strength: float = 0.75,
        negative_prompt=None,
        steps: int = 30,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        callback=None,
        progress: bool = True,
        **micro,
    ) -> list[PIL.Image.Image]:
        """Image to image: `image` (PIL or path) noised to `strength` then denoised. The output size is
        width x height, by default the image's own size rounded down to a multiple of 8."""
        sdxl = self._sdxl_call(negative_prompt, micro, None, None)
        image = imageio.load_image(image, "init image")
        width, height = self._size_for_image(image, width, height)
        request = self._request(
            "img2img", prompt, negative_prompt, steps, guidance, width, height, seed, num_images, scheduler, strength
        )
        return self._run(request, image=image, callback=callback, progress=progress, sdxl=sdxl)

    def inpaint(
        self,
        image,
        mask,
        prompt,
        *,
        strength: float = 1.0,
        negative_prompt=None,
        steps: int = 30,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        callback=None,
        progress: bool = True,
        **micro,
    ) -> list[PIL.Image.Image]:
        """Repaint where `mask` is white (>= 50% gray), keep the rest. 9-channel inpainting UNets get the
        mask and masked image as input; ordinary 4-channel UNets blend the known region back each step."""
        sdxl = self._sdxl_call(negative_prompt, micro, None, None)
        image, mask = self._inpaint_inputs(image, mask)
        width, height = self._size_for_image(image, width, height)
        request = self._request(
            "inpaint", prompt, negative_prompt, steps, guidance, width, height, seed, num_images, scheduler, strength
        )
        return self._run(request, image=image, mask=mask, callback=callback, progress=progress, sdxl=sdxl)

    def __call__(self, prompt=None, **kwargs):
        """diffusers' call: pipe(prompt, num_inference_steps=, guidance_scale=, ...) -> object with .images
        (runtime/diffusers_compat.py)."""
        from runtime.diffusers_compat import diffusers_call

        return diffusers_call(self, prompt, **kwargs)

    def to(self, *args, **kwargs) -> Pipeline:
        """diffusers' .to(device), .to(dtype), .to(device, dtype); returns self (runtime/diffusers_compat.py)."""
        from runtime.diffusers_compat import move_pipeline

        return move_pipeline(self, *args, **kwargs)

    # ------------------------------------------------------------------ LoRA (runtime/lora.py)
    def load_lora(self, path, scale: float = 1.0, name: str | None = None, allow_pickle: bool = False) -> str:
        """Apply a LoRA .safetensors in place (kohya or diffusers/peft names); returns its name (the file
        stem by default). Several may be loaded, each with its scale; CUDA graphs are kept."""
        with self._run_lock:
            return self._lora_set().load(path, scale=scale, name=name, allow_pickle=allow_pickle)

    def set_lora_scale(self, name: str, scale: float) -> None:
        with self._run_lock:
            self._lora_set().set_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (all when name is None); the weights it alone touched get their base bits back."""
        with self._run_lock:
            self._lora_set().unload(name)

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs, in load order."""
        return {} if self._loras is None else self._loras.scales

    def _lora_set(self) -> lora.LoraSet:
        if self._loras is None:
            networks = {"unet": self.unet, "text_encoder": self.text_encoder}
            networks["text_encoder_2"] = getattr(self.components, "text_encoder_2", None)
            # Exported graphs (runtime/backends/deployed.py): merge into the torch weights they were exported
            # from, and let the stand-in carry the changed weights into its engine.
            engines = {n: m for n, m in networks.items() if m is not None and not isinstance(m, torch.nn.Module)}
            for name, stand_in in engines.items():
                if getattr(stand_in, "weights", None) is None:
                    raise NotImplementedError(
                        f"the {self.backend} backend's {name} was prepared without its torch weights "
                        f"(keep_weights=False), which LoRAs merge into; prepare it with keep_weights=True"
                    )
                networks[name] = stand_in.weights
            self._loras = lora.LoraSet(networks, kind=self.components.kind, engines=engines)
        return self._loras

    # ------------------------------------------------------------------ validation
    def _inpaint_inputs(self, image, mask):
        image = imageio.load_image(image, "init image")
        mask = imageio.load_image(mask, "mask")
        if mask.size != image.size:
            raise ValueError(
                f"mask size {mask.size[0]}x{mask.size[1]} differs from the image size "
                f"{image.size[0]}x{image.size[1]}; give a mask of the same size"
            )
        if self.unet.config.in_channels not in (4, 9):
            raise ValueError(
                f"inpainting needs a UNet with 4 or 9 input channels, this one has "
                f"in_channels={self.unet.config.in_channels}"
            )
        return image, mask

    def _sdxl_call(self, negative_prompt, micro: dict, refiner, refiner_start) -> _SDXLCall | None:
        """The SDXL arguments checked (refiner's family and role, refiner_start, micro-conditioning)."""
        kind = getattr(self.components, "kind", "sd1")
        micro_conditioning = conditioning.MicroConditioning.from_kwargs(micro, kind)
        refiner_start = conditioning.check_refiner(kind, refiner, refiner_start)
        if self.conditioner is None:
            return None
        if refiner is not None and refiner.vae.config.latent_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"refiner {refiner.components.source} has {refiner.vae.config.latent_channels} latent "
                f"channels, this base {self.vae.config.latent_channels}"
            )
        return _SDXLCall(micro_conditioning, negative_prompt is None, refiner, refiner_start)

    def native_size(self) -> tuple[int, int]:
        """(width, height) the UNet was trained at: sample_size * the VAE factor."""
        sample_size = self.unet.config.sample_size
        if sample_size is None:  # configs that omit it: Stable Diffusion 1.x's 64 latents (512 px)
            sample_size = 64
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        height, width = sample_size
        return width * self.vae_scale_factor, height * self.vae_scale_factor

    def _size_for_image(self, image, width, height) -> tuple[int, int]:
        if width is not None and height is not None:
            return width, height
        factor = self.vae_scale_factor
        image_width, image_height = image.size
        rounded = (image_width - image_width % factor, image_height - image_height % factor)
        if rounded[0] < factor or rounded[1] < factor:
            raise ValueError(f"init image is {image_width}x{image_height}; it must be at least {factor}x{factor}")
        if rounded != image.size and (width is None or height is None):
            warnings.warn(
                f"init image size {image_width}x{image_height} is not a multiple of {factor}; "
                f"it is resized to {rounded[0]}x{rounded[1]}",
                stacklevel=3,
            )
        return (width if width is not None else rounded[0]), (height if height is not None else rounded[1])

    def _request(
        self, mode, prompt, negative_prompt, steps, guidance, width, height, seed, num_images, scheduler, strength
    ) -> _Request:
        prompts = _prompt_list(prompt, "prompt")
        validation.check_prompt_text(prompts, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            validation.check_prompt_text([negative_prompt], "negative_prompt")
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = _prompt_list(negative_prompt, "negative_prompt")
            validation.check_prompt_text(negatives, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        validation.check_batch(len(prompts), num_images)
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance < math.inf:
            raise ValueError(f"guidance must be a finite number >= 0 (<= 1 turns guidance off), got {guidance!r}")
        if guidance <= 1 and negative_prompt:
            warnings.warn(
                f"guidance {guidance} <= 1 turns classifier-free guidance off: the negative prompt is ignored",
                stacklevel=3,
            )
        default_width, default_height = self.native_size()
        width = default_width if width is None else width
        height = default_height if height is None else height
        for name, value in (("width", width), ("height", height)):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < self.vae_scale_factor
                or value % self.vae_scale_factor
            ):
                raise ValueError(
                    f"{name} must be a positive multiple of {self.vae_scale_factor} (the VAE factor), got {value!r}"
                )
        validation.check_pixels(
            width, height, len(prompts) * num_images, guidance > 1, torch.finfo(self.dtype).bits // 8, self.max_pixels
        )
        if strength is not None:
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength!r}")
            if int(steps * strength) < 1:
                raise ValueError(
                    f"strength {strength} with {steps} steps leaves no denoising step "
                    f"(int(steps * strength) = 0); raise steps or strength"
                )
        if scheduler is not None and scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        if seed is None:
            seed = secrets.randbelow(validation.SEED_LIMIT)
        validation.check_seed(seed)
        return _Request(
            mode=mode,
            prompts=prompts,
            negatives=negatives,
            steps=steps,
            guidance=float(guidance),
            width=width,
            height=height,
            seed=seed,
            num_images=num_images,
            scheduler=scheduler,
            scheduler_name=scheduler or self.default_scheduler_name(),
            strength=strength,
        )

    def default_scheduler_name(self) -> str:
        """Our name for the scheduler the checkpoint's config names."""
        return config_name(self.scheduler_config)

    # ------------------------------------------------------------------ the run
    def _run(
        self,
        request: _Request,
        *,
        image=None,
        mask=None,
        callback=None,
        progress=True,
        inputs: CallerInputs | None = None,
        sdxl=None,
    ):
        validation.check_callback(callback)
        inputs = inputs or CallerInputs()
        if inputs.context is not None and self.conditioner is not None:
            raise ValueError(
                "prompt_embeds are not supported for SDXL yet (it also needs pooled text_embeds); pass the prompt text"
            )
        with self._run_lock, torch.inference_mode():
            return self._run_locked(
                request, image=image, mask=mask, callback=callback, progress=progress, inputs=inputs, sdxl=sdxl
            )

    def _run_locked(self, request: _Request, *, image, mask, callback, progress, inputs, sdxl=None):
        self.scheduler = scheduler = make_scheduler(request.scheduler, self.scheduler_config)
        scheduler.set_timesteps(request.steps, device=self.device)
        end = refine = None
        if sdxl is not None and sdxl.refiner is not None:
            end, refine = self._plan_refiner(request, sdxl, callback, progress)
        if inputs.context is None:
            context, added = self._conditioning(request, sdxl)
        else:
            context, added = inputs.context, None
        generator = inputs.generator or torch.Generator("cpu").manual_seed(request.seed)
        batch = len(request.prompts) * request.num_images
        shape = (
            batch,
            self.vae.config.latent_channels,
            request.height // self.vae_scale_factor,
            request.width // self.vae_scale_factor,
        )
        start, conditioning, blend = 0, None, None
        if request.mode == "txt2img":
            initial = (
                inputs.latents.to(self.device, self.dtype)
                if inputs.latents is not None
                else self._randn(shape, generator)
            )
            latents = initial * scheduler.init_noise_sigma
        elif request.mode == "img2img":
            start = scheduler.img2img_start(request.strength)
            latents = self._img2img_latents(image, request, shape, start, generator)
        else:
            start = scheduler.img2img_start(request.strength)
            latents, conditioning, blend = self._inpaint_latents(
                image, mask, request, shape, start, context.shape[0] != batch, generator
            )
        noise = scheduler.draw_noise(generator, shape, self.dtype, self.device, end=end)
        latents = self.denoise(
            latents,
            context,
            request.guidance,
            start=start,
            noise=noise,
            conditioning=conditioning,
            blend=blend,
            callback=callback,
            progress=progress,
            added=added,
            end=end,
        )
        validation.check_finite(
            latents,
            f"the denoised latents (after the UNet and the {request.scheduler_name} "
            f"scheduler, before the VAE; guidance {request.guidance:g})",
        )
        if refine is not None:
            if inputs.output != "pil":
                raise ValueError("a refiner run returns images; output_type 'latent' / 'pt' is not supported with it")
            return refine(latents, generator)
        if inputs.output == "latent":
            return latents
        decoded = self.decode_latents(latents)
        return decoded if inputs.output == "tensor" else self._finish(decoded, request)

    def _conditioning(self, request: _Request, sdxl: _SDXLCall | None):
        """(context, added conditioning for the UNet: None, or SDXL's {"text_embeds", "time_ids"})."""
        if self.conditioner is None:
            return self.encode_prompt(request.prompts, request.negatives, request.guidance, request.num_images), None
        guided = request.guidance > 1
        context, text_embeds = self.conditioner.encode(
            request.prompts,
            request.negatives,
            sdxl.zero_negatives,
            guided,
            request.num_images,
            self.device,
            self.dtype,
            syntax=self.prompt_syntax,
        )
        time_ids = self.conditioner.time_ids(
            sdxl.micro,
            request.mode,
            request.height,
            request.width,
            len(request.prompts) * request.num_images,
            guided,
            self.device,
            self.dtype,
        )
        return context, {"text_embeds": text_embeds, "time_ids": time_ids}

    def _plan_refiner(self, request: _Request, sdxl: _SDXLCall, callback, progress):
        """(the base's end step, a function that finishes on the refiner), checked before any network runs."""
        end = conditioning.base_end(self.scheduler, sdxl.refiner_start)
        refiner = sdxl.refiner
        refiner_scheduler = make_scheduler(request.scheduler, refiner.scheduler_config)
        refiner_scheduler.set_timesteps(request.steps, device=refiner.device)
        begin = conditioning.refiner_begin(refiner_scheduler, sdxl.refiner_start)
        if end == 0 or begin >= refiner_scheduler.num_steps:
            raise ValueError(
                f"refiner_start={sdxl.refiner_start} with {request.steps} steps leaves "
                f"{'the base' if end == 0 else 'the refiner'} no step; move refiner_start or add steps"
            )
        refiner_call = replace(sdxl, refiner=None, refiner_start=None)

        def refine(latents: torch.Tensor, generator: torch.Generator) -> list[PIL.Image.Image]:
            lock = contextlib.nullcontext() if refiner is self else refiner._run_lock
            with lock:
                return refiner._refine_locked(
                    latents,
                    request,
                    refiner_call,
                    refiner_scheduler,
                    begin,
                    generator,
                    callback=callback,
                    progress=progress,
                )

        return end, refine

    def _refine_locked(
        self, latents, request: _Request, sdxl: _SDXLCall, scheduler, begin: int, generator, callback, progress
    ) -> list[PIL.Image.Image]:
        """Denoise `latents` (a base's, at step `begin`) from `begin` on, as diffusers' img2img with
        denoising_start: no noise is added; ancestral draws continue the base's generator."""
        self.scheduler = scheduler
        scheduler.start_at(begin)
        context, added = self._conditioning(replace(request, mode="img2img"), sdxl)
        latents = latents.to(self.device, self.dtype)
        noise = scheduler.draw_noise(generator, tuple(latents.shape), self.dtype, self.device)
        latents = self.denoise(
            latents,
            context,
            request.guidance,
            start=begin,
            noise=noise,
            callback=callback,
            progress=progress,
            added=added,
        )
        validation.check_finite(latents, "the refined latents (after the refiner's UNet, before the VAE)")
        return self._finish(self.decode_latents(latents), request)

    def encode_prompt(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        guidance: float,
        num_images: int = 1,
        clip_skip: int | None = None,
    ) -> torch.Tensor:
        """Text-encoder context [B, K * 77, C], B = len(prompts) * num_images, each prompt repeated in place;
        with guidance > 1 the unconditional half comes first: [uncond; cond], 2B rows. Prompts are read
        with `self.prompt_syntax` (runtime/prompt_syntax.py: K = 1 for prompts of at most 75 tokens)."""
        guided = guidance > 1
        if negatives is None:
            negatives = [""] * len(prompts)
        if self.conditioner is not None:  # SDXL: both encoders' penultimate states (no force-zeros here)
            encoded = self.conditioner.encode(
                prompts, negatives, False, guided, num_images, self.device, self.dtype, syntax=self.prompt_syntax
            )
            return encoded[0]
        texts = (list(negatives) if guided else []) + list(prompts)
        labels = ([f"negative prompt {i}" for i in range(len(negatives))] if guided else []) + [
            f"prompt {i}" for i in range(len(prompts))
        ]
        context = encode_prompts(
            self.tokenizer, self.text_encoder, texts, syntax=self.prompt_syntax, clip_skip=clip_skip, labels=labels
        )
        context = context.to(self.dtype).repeat_interleave(num_images, dim=0)
        return context

    def _randn(self, shape, generator) -> torch.Tensor:
        """diffusers' randn_tensor with a CPU generator: drawn on the CPU in the model dtype, then moved.
        (Drawing fp32 and casting is not the same: for some shapes CPU fp16 randn gives other values.)"""
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    def _encode_image(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """A sample of the VAE posterior, scaled: mean + std * randn(generator), as diffusers'
        `latent_dist.sample(generator)` (one draw of the latent shape per call). Every backend's VAE
        (ours, and the exported ones) gives the posterior's (mean, logvar) through `encode_moments`."""
        with self._vae_precision() as vae_dtype:
            mean, logvar = self.vae.encode_moments(pixels.to(self.device, vae_dtype))
        # Drawn in the posterior's dtype (fp32 when upcast), as diffusers' latent_dist.sample.
        draw = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * draw
        return (sample * self.vae.config.scaling_factor).to(self.dtype)

    @contextlib.contextmanager
    def _vae_precision(self):
        """The dtype to run the VAE in, yielded with the VAE cast to it. SDXL honours the VAE config's
        force_upcast as diffusers' SDXL pipelines do: an fp16 VAE runs in fp32 inside, and is put back after
        (SD 1/2 pipelines, like diffusers', run it in the model dtype). Exported VAEs stay as exported."""
        vae_dtype = _module_dtype(self.vae, self.dtype)
        if self.conditioner is None or vae_dtype != torch.float16 or not self.vae.config.force_upcast:
            yield vae_dtype
            return
        try:
            self.vae.to(torch.float32)
        except NotImplementedError:  # an exported VAE runs in the dtype it was exported in
            yield vae_dtype
            return
        try:
            yield torch.float32
        finally:
            self.vae.to(vae_dtype)

    def _img2img_latents(self, image, request, shape, start, generator) -> torch.Tensor:
        pixels = imageio.image_to_tensor(image, request.width, request.height)
        image_latents = self._encode_image(pixels, generator).expand(shape[0], -1, -1, -1)
        noise = self._randn(shape, generator)
        return self.scheduler.add_noise(image_latents, noise, start)

    def _inpaint_latents(self, image, mask, request, shape, start, guided, generator):
        pixels = imageio.image_to_tensor(image, request.width, request.height)
        mask_pixels = imageio.mask_to_tensor(mask, request.width, request.height)
        four_channel = self.unet.config.in_channels == 4
        full_strength = request.strength == 1.0
        image_latents = None
        if four_channel or not full_strength:
            image_latents = self._encode_image(pixels, generator).expand(shape[0], -1, -1, -1)
        noise = self._randn(shape, generator)
        if full_strength:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(image_latents, noise, start)
        latent_mask = F.interpolate(mask_pixels, size=shape[-2:]).to(self.device, self.dtype)
        latent_mask = latent_mask.expand(shape[0], -1, -1, -1)
        if four_channel:
            # diffusers samples the masked image's latents here even for 4-channel UNets (and never uses
            # them): make the same draw, skipping the encode, so later draws stay aligned.
            self._randn((1, *shape[1:]), generator)
            return latents, None, _LatentBlend(image_latents, latent_mask, noise)
        masked_latents = self._encode_image(pixels * (mask_pixels < 0.5), generator)
        conditioning = torch.cat([latent_mask, masked_latents.expand(shape[0], -1, -1, -1)], dim=1)
        if guided:
            conditioning = torch.cat([conditioning, conditioning])
        return latents, conditioning, None

    def denoise(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        guidance: float,
        *,
        start: int = 0,
        noise: torch.Tensor | None = None,
        conditioning: torch.Tensor | None = None,
        blend: _LatentBlend | None = None,
        callback=None,
        progress: bool = True,
        added: dict[str, torch.Tensor] | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run steps start..end-1 (end: S) of `self.scheduler` (already set up); return the final latents.
        `added`: the UNet's added conditioning (SDXL's text_embeds / time_ids), the same at every step."""
        self.scheduler.reset()
        if self.graphs is not None:
            between_steps = None
            if blend is not None or callback is not None:

                def between_steps(i, x):
                    return self._after_step(i, x, start, blend, callback)

            return self.graphs.run(
                self.scheduler,
                latents,
                guidance,
                start=start,
                end=end,
                noise=noise,
                inputs=dict(context=context, conditioning=conditioning, **(added or {})),
                between_steps=between_steps,
                progress=lambda steps: tqdm(steps, disable=not progress, desc="denoising"),
            )
        stop = self.scheduler.num_steps if end is None else end
        for i in tqdm(range(start, stop), disable=not progress, desc="denoising"):
            noise_i = None if noise is None else noise[i]
            latents = self._denoise_step(latents, i, context, guidance, noise_i, conditioning, added)
            latents = self._after_step(i, latents, start, blend, callback)
        return latents

    def _denoise_step(
        self,
        latents: torch.Tensor,
        i: int,
        context: torch.Tensor,
        guidance: float,
        noise_i: torch.Tensor | None,
        conditioning: torch.Tensor | None = None,
        added: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One step with the run's scheduler; the unit a CUDA-graph runner replaces."""
        return self.denoise_step(self.scheduler, latents, i, context, guidance, noise_i, conditioning, **(added or {}))

    def denoise_step(
        self,
        scheduler,
        latents: torch.Tensor,
        i: int,
        context: torch.Tensor,
        guidance,
        noise_i: torch.Tensor | None,
        conditioning: torch.Tensor | None = None,
        **added: torch.Tensor,
    ) -> torch.Tensor:
        """UNet once on the guided batch [uncond; cond], guidance combine, scheduler step.

        Guided iff `context` has twice the rows of `latents`. `guidance` may be a float or a 0-d device
        tensor (a captured graph keeps it in a buffer). `conditioning` (9-channel inpainting: mask and
        masked-image latents) is appended to the UNet input's channels. `added`: extra named UNet inputs
        (SDXL's text_embeds, time_ids), already in guided-batch order; a graph runner keeps each in a buffer.
        Pure tensor work, no host sync.
        """
        guided = context.shape[0] != latents.shape[0]
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, i)
        if conditioning is not None:
            model_input = torch.cat([model_input, conditioning], dim=1)
        prediction = self.unet(model_input, scheduler.timesteps[i], context, **added)
        if guided:
            uncond, cond = prediction.chunk(2)
            # The product in fp32, rounded once to the model dtype: what a kernel does with a Python float
            # (its opmath), and also what a 0-d fp32 tensor gives, which in fp16 math would first round
            # 7.3 to 7.30078. So eager (a float) and a graph replay (a buffer) give the same bits.
            scaled = (guidance * (cond - uncond).float()).to(prediction.dtype)
            prediction = uncond + scaled
        return scheduler.step(prediction, i, latents, noise=noise_i)

    def _after_step(
        self, i: int, latents: torch.Tensor, start: int, blend: _LatentBlend | None, callback
    ) -> torch.Tensor:
        """Eager work between steps: 4-channel inpainting's blend, then the callback (which may cancel)."""
        if blend is not None:
            known = blend.image_latents
            if i < self.scheduler.num_steps - 1:
                known = self.scheduler.add_noise(known, blend.noise, i + 1)
            latents = (1 - blend.mask) * known + blend.mask * latents
        if callback is not None and callback(i - start, self.scheduler.timesteps[i], latents) is False:
            raise GenerationCancelled(i - start, latents)
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1]. If the decode overflows to NaN (fp16 VAEs do), decode
        again with the VAE in fp32 once, with a warning; if that is NaN too, raise rather than return black."""
        scaled = latents / self.vae.config.scaling_factor
        with self._vae_precision() as vae_dtype:
            decoded = self.vae.decode(scaled.to(vae_dtype))
        if not torch.isfinite(decoded).all():  # NaN, or +-inf that clamping would turn white / black
            vae_dtype = next(self.vae.parameters()).dtype
            if vae_dtype == torch.float32:
                raise FloatingPointError(_vae_broken(decoded, scaled, "in fp32"))
            kind = "NaN" if torch.isnan(decoded).any() else "inf"
            warnings.warn(f"the VAE decoded {kind} in {vae_dtype}; decoding again in fp32", stacklevel=2)
            try:
                self.vae.to(torch.float32)
            except NotImplementedError as err:  # an exported VAE runs in the dtype it was exported in
                raise FloatingPointError(
                    f"the VAE decoded NaN in {vae_dtype} and the {self.backend} backend "
                    f"cannot decode again in fp32: {err}"
                ) from None
            try:
                decoded = self.vae.decode(scaled.float())
            finally:
                self.vae.to(vae_dtype)
            if not torch.isfinite(decoded).all():
                raise FloatingPointError(_vae_broken(decoded, scaled, "even in fp32"))
        return imageio.denormalize(decoded)

    def to_pil(self, images: torch.Tensor) -> list[PIL.Image.Image]:
        return imageio.to_pil(images)

    def _finish(self, decoded: torch.Tensor, request: _Request) -> list[PIL.Image.Image]:
        pil_images = self.to_pil(decoded)
        source = getattr(self.components, "source", None)
        base = GenerationInfo(
            prompt="",
            negative_prompt="",
            seed=request.seed,
            steps=request.steps,
            guidance=request.guidance,
            scheduler=request.scheduler_name,
            width=request.width,
            height=request.height,
            mode=request.mode,
            strength=request.strength,
            model=Path(str(source)).name if source else None,
            model_hash=model_hash(source) if source else None,
            backend=self.backend,
            dtype=precision_name(self.dtype),
        )
        for index, pil_image in enumerate(pil_images):
            prompt_index = index // request.num_images
            info = replace(
                base,
                prompt=request.prompts[prompt_index],
                negative_prompt=request.negatives[prompt_index] if request.guidance > 1 else "",
                batch_index=index,
            )
            pil_image.info.update(info.as_text_chunks())
        return pil_images


def _vae_broken(decoded: torch.Tensor, latents: torch.Tensor, how: str) -> str:
    kind = "NaN" if torch.isnan(decoded).any() else "inf"
    if not torch.isfinite(latents).all():
        return f"the VAE decoded {kind} {how}: the latents it was given already hold NaN or inf"
    return (
        f"the VAE decoded {kind} {how} from finite latents: the VAE weights are broken (a NaN or inf "
        f"weight, e.g. in decoder.conv_out)"
    )


def _module_dtype(module, default: torch.dtype) -> torch.dtype:
    parameter = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return default if parameter is None else parameter.dtype


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")
