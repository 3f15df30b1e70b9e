"""txt2img, img2img and inpainting over loaded components; numerically the diffusers pipelines.

Stages are separate methods so a benchmark can time them and a faster backend can replace one:
    encode_prompt -> start latents (runtime/latents.py) -> denoise (a loop over `denoise_step`)
    -> decode_latents -> to_pil
`denoise_step(scheduler, latents, i, context, guidance, noise_i, conditioning, **added)` is the one step:
pure tensor work (no host syncs), the StepFn a CUDA-graph runner (runtime/graphs.py) captures and
replays. `_after_step(run, i, latents)` is the eager work between steps (inpainting blend, callback),
a graph runner's `between_steps`. A run's state (scheduler, start / end step, noise, blend, ...) is
one `latents.DenoiseRun`, passed to each stage, never kept on the pipeline.

What a call asks for is one `GenerationRequest` (runtime/generation_options.py): generate / img2img /
inpaint build one from their keywords; `generate_batch` takes several, validated before any network
runs, and denoises those with equal `batch_key(pipe)` in one loop, each request keeping its own
prompt, seed (its own generator, drawn in a solo run's order), guidance scale and images.

SDXL (runtime/conditioning.py): two text encoders, and `text_embeds` / `time_ids` passed to the UNet as
added conditioning (`added`, named tensors) through every step; `generate(..., refiner=, refiner_start=)`
runs the base up to the cutoff and the refiner from there, one generator across both, as diffusers'
denoising_end / denoising_start pair of calls.

Cancelling: `callback(step_index, timestep, latents)` returning False raises `GenerationCancelled`
(holding the latents reached); no image is decoded, so a cancelled run costs no VAE time.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from runtime import conditioning, embeddings, latents, lora, prompt_loras, validation
from runtime import images as imageio
from runtime.caller_inputs import CallerInputs
from runtime.dtypes import precision_name
from runtime.generation_options import CheckedRequest, GenerationRequest, check_batch, check_request
from runtime.graph_calls import CudaGraphCall, GraphedTextEncoder
from runtime.graph_weights import torch_modules
from runtime.graphs import CudaGraphDenoiser
from runtime.images import GenerationInfo
from runtime.model_hash import model_hash
from runtime.prompt_syntax import encode_prompts
from runtime.schedulers import config_name, make_scheduler

__all__ = ["GenerationCancelled", "GenerationRequest", "Pipeline"]


class GenerationCancelled(RuntimeError):
    """The step callback returned False. `step_index` is the last step run; `latents` the latents after it."""

    def __init__(self, step_index: int, latents: torch.Tensor):
        super().__init__(f"generation cancelled by the callback after step {step_index}")
        self.step_index = step_index
        self.latents = latents


class Pipeline:
    """Stable Diffusion over `components` (runtime.weights.Components) prepared by a backend."""

    prompt_syntax = "a1111"  # how prompts are read: runtime/prompt_syntax.py's PROMPT_SYNTAXES
    max_pixels: int | None = validation.DEFAULT_MAX_PIXELS  # per image; None: no limit
    lora_dir = None  # the folder `<lora:NAME:W>` in prompts names files in (runtime/prompt_loras.py)
    embeddings_dir = None  # textual-inversion NAME.safetensors used by name in prompts (runtime/embeddings.py)

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
        # The latest run's scheduler, for callers to inspect (diffusers' pipe.scheduler); no stage reads it.
        self.scheduler = None
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        parameter = next(self.unet.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if cuda_graphs is None:
            cuda_graphs = backend == "triton" and self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda" and graph_api is None:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        unet_weights = torch_modules(self.unet)
        self.graphs = (
            CudaGraphDenoiser(self.denoise_step, graph_api=graph_api, weights=unet_weights) if cuda_graphs else None
        )
        # The rest of a request replays from graphs too: text encoder(s) and VAE decode (runtime/graph_calls.py).
        # Our torch modules only: an exported backend's stand-ins run their own engines.
        self._prompt_encoder = self.text_encoder  # what encode_prompt calls: the module, or its graphed stand-in
        self.text_encoder_graphs: list[GraphedTextEncoder] = []
        self.vae_graphs = None
        if cuda_graphs:
            self._graph_text_encoders(graph_api)
            if torch_modules(self.vae):
                self.vae_graphs = CudaGraphCall(
                    lambda z: self.vae.decode(z), "VAE decode", torch_modules(self.vae), graph_api=graph_api
                )
        # One request at a time: a run replays shared graph buffers and may move the VAE's dtype.
        self._run_lock = validation.ReentryGuard()
        self._loras: lora.LoraSet | None = None  # created by the first load_lora

    def _graph_text_encoders(self, graph_api) -> None:
        """What encode_prompt and the SDXL conditioner call, as graphed stand-ins (the modules stay the
        pipeline's own, for LoRA and .to())."""
        if torch_modules(self.text_encoder):
            self._prompt_encoder = GraphedTextEncoder(self.text_encoder, "text encoder", graph_api)
            self.text_encoder_graphs.append(self._prompt_encoder)
        if self.conditioner is not None:
            graphed = []
            for tokenizer, encoder in self.conditioner.encoders:
                if encoder is self.text_encoder:  # SDXL base: encoder 1 is the one above
                    encoder = self._prompt_encoder
                elif torch_modules(encoder):
                    encoder = GraphedTextEncoder(encoder, "text encoder 2", graph_api)
                    self.text_encoder_graphs.append(encoder)
                graphed.append((tokenizer, encoder))
            self.conditioner.encoders = graphed

    # ------------------------------------------------------------------ public entry points
    def generate(
        self,
        prompt,
        *,
        callback=None,
        progress: bool = True,
        refiner: Pipeline | None = None,
        refiner_start: float | None = None,
        **options,
    ) -> list[PIL.Image.Image]:
        """Text to image. `options`: GenerationRequest's fields (negative_prompt, steps=30, guidance=7.5,
        width, height, seed, num_images=1, scheduler, and SDXL's micro-conditioning: original_size,
        crops_coords_top_left, target_size and their negative_* forms). Returns `len(prompts) *
        num_images` PIL images (each prompt's images together); each image's `info` holds the generation
        parameters (seed included) as PNG text entries. SDXL: `refiner` (another SDXL pipeline)
        finishes from `refiner_start` (default 0.8) of the denoising."""
        if self.conditioner is not None and self.conditioner.is_refiner:
            raise ValueError(
                f"{self.components.source} is an SDXL refiner (requires_aesthetics_score): it cannot "
                f"generate from noise; use it as refiner= of an SDXL base's generate, or img2img"
            )
        request = check_request(self, _options_request("generate", prompt, options, ()))
        refiner_start = self._check_refiner(refiner, refiner_start)
        plan = None if refiner is None else (refiner, refiner_start)
        return self._run([request], callback=callback, progress=progress, refiner=plan)[0]

    def img2img(
        self, image, prompt, *, strength: float = 0.75, callback=None, progress: bool = True, **options
    ) -> list[PIL.Image.Image]:
        """Image to image: `image` (PIL or path) noised to `strength` then denoised. `options` as
        generate's. The output size is width x height, by default the image's own size rounded down to
        a multiple of 8."""
        options = dict(options, image=image, strength=strength)
        request = check_request(self, _options_request("img2img", prompt, options, ("image", "strength")))
        return self._run([request], callback=callback, progress=progress)[0]

    def inpaint(
        self, image, mask, prompt, *, strength: float = 1.0, callback=None, progress: bool = True, **options
    ) -> list[PIL.Image.Image]:
        """Repaint where `mask` is white (>= 50% gray), keep the rest. 9-channel inpainting UNets get the
        mask and masked image as input; ordinary 4-channel UNets blend the known region back each step.
        `options` as generate's."""
        options = dict(options, image=image, mask=mask, strength=strength)
        request = check_request(self, _options_request("inpaint", prompt, options, ("image", "mask", "strength")))
        return self._run([request], callback=callback, progress=progress)[0]

    def generate_batch(
        self, requests: list[GenerationRequest], *, progress: bool = False, callback=None
    ) -> list[list[PIL.Image.Image]]:
        """Several requests through one denoising loop: one list of images per request, in order, each
        equal (up to batched-matmul rounding) to what generate / img2img / inpaint gives it alone, with
        its own PNG metadata. Every request is validated first (errors name its index); all must have
        equal `batch_key(self)` (ValueError naming the fields that differ). A callback returning False
        cancels the whole batch (GenerationCancelled). No refiner here: call generate for that."""
        checked = check_batch(self, requests)
        if self.conditioner is not None and self.conditioner.is_refiner and checked[0].mode == "txt2img":
            raise ValueError(f"{self.components.source} is an SDXL refiner: it cannot generate from noise")
        return self._run(checked, callback=callback, progress=progress)

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

    # ------------------------------------------------------------------ validation (runtime/generation_options.py)
    def _check_refiner(self, refiner, refiner_start) -> float | None:
        """The validated refiner_start (refiner's family and role, latent channels); None without one."""
        refiner_start = conditioning.check_refiner(getattr(self.components, "kind", "sd1"), refiner, refiner_start)
        if refiner is not None and refiner.vae.config.latent_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"refiner {refiner.components.source} has {refiner.vae.config.latent_channels} latent "
                f"channels, this base {self.vae.config.latent_channels}"
            )
        return refiner_start

    def native_size(self) -> tuple[int, int]:
        """(width, height) the UNet was trained at: sample_size * the VAE factor."""
        sample_size = self.unet.config.sample_size
        if sample_size is None:  # configs that omit it: Stable Diffusion 1.x's 64 latents (512 px)
            sample_size = 64
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        height, width = sample_size
        return width * self.vae_scale_factor, height * self.vae_scale_factor

    def default_scheduler_name(self) -> str:
        """Our name for the scheduler the checkpoint's config names."""
        return config_name(self.scheduler_config)

    # ------------------------------------------------------------------ the run
    def _run(
        self,
        requests: list[CheckedRequest],
        *,
        callback=None,
        progress=True,
        inputs: CallerInputs | None = None,
        refiner: tuple[Pipeline, float] | None = None,
    ):
        """Checked requests with one batch key -> one list of images per request (or, for one request
        and CallerInputs.output "tensor" / "latent", that tensor)."""
        validation.check_callback(callback)
        inputs = inputs or CallerInputs()
        if inputs.context is not None and self.conditioner is not None:
            raise ValueError(
                "prompt_embeds are not supported for SDXL yet (it also needs pooled text_embeds); pass the prompt text"
            )
        # Prompt LoRAs go on before inference mode and come off after it (they write parameters); every
        # prompt of the batch must name the same ones (runtime/prompt_loras.py; the batch key holds them).
        prompts = [prompt for request in requests for prompt in request.prompts]
        loras = prompt_loras.applied(self._lora_set, prompts, self.lora_dir)
        with self._run_lock, loras, torch.inference_mode():
            return self._run_locked(requests, callback, progress, inputs, refiner)

    def _run_locked(self, requests: list[CheckedRequest], callback, progress, inputs: CallerInputs, refiner):
        first = requests[0]  # the batch key (mode, size, steps, scheduler, strength, guided) is shared
        scheduler = make_scheduler(first.scheduler, self.scheduler_config)
        scheduler.set_timesteps(first.steps, device=self.device)
        self.scheduler = scheduler
        start = 0 if first.mode == "txt2img" else scheduler.img2img_start(first.strength)
        end = finish = None
        if refiner is not None:
            end, finish = self._plan_refiner(first, scheduler, *refiner, callback, progress)
        if inputs.context is None:
            context, added = self._batch_conditioning(requests)
        else:
            context, added = inputs.context, None
        rows = sum(request.rows for request in requests)
        guided = context.shape[0] != rows
        starts, noises, generators = [], [], []
        for request in requests:
            generator = inputs.generator or torch.Generator("cpu").manual_seed(request.seed)
            shape = (
                request.rows,
                self.vae.config.latent_channels,
                request.height // self.vae_scale_factor,
                request.width // self.vae_scale_factor,
            )
            starts.append(latents.start_latents(self, scheduler, request, start, shape, generator, inputs.latents))
            noises.append(scheduler.draw_noise(generator, shape, self.dtype, self.device, end=end))
            generators.append(generator)
        initial, extra_channels, blend = latents.concatenated(starts, guided)
        run = latents.DenoiseRun(
            scheduler=scheduler,
            context=context,
            guidance=self._guidance(requests, guided),
            start=start,
            end=end,
            noise=latents.noise_rows(noises),
            conditioning=extra_channels,
            added=added,
            blend=blend,
            callback=callback,
            progress=progress,
        )
        final = self.denoise(run, initial)
        scales = ", ".join(sorted({f"{request.guidance:g}" for request in requests}))
        validation.check_finite(
            final,
            f"the denoised latents (after the UNet and the {first.scheduler_name} "
            f"scheduler, before the VAE; guidance {scales})",
        )
        if finish is not None:
            if inputs.output != "pil":
                raise ValueError("a refiner run returns images; output_type 'latent' / 'pt' is not supported with it")
            return [finish(final, generators[0])]
        if inputs.output == "latent":
            return final
        decoded = self.decode_latents(final)
        if inputs.output == "tensor":
            return decoded
        return self._finish_each(decoded, requests)

    def _guidance(self, requests: list[CheckedRequest], guided: bool) -> float | torch.Tensor:
        """One scale, or (requests with different scales) a [B] fp32 tensor of each latent row's."""
        scales = [request.guidance for request in requests]
        if not guided or len(set(scales)) == 1:
            return scales[0]
        per_row = [request.guidance for request in requests for _ in range(request.rows)]
        return torch.tensor(per_row, dtype=torch.float32, device=self.device)

    def _batch_conditioning(self, requests: list[CheckedRequest]):
        """The requests' contexts (and SDXL's added conditioning) in guided-batch order [uncond; cond]."""
        parts = [self._conditioning(request) for request in requests]
        guided = requests[0].guided
        context = latents.guided_rows([part[0] for part in parts], guided)
        if parts[0][1] is None:
            return context, None
        added = {name: latents.guided_rows([part[1][name] for part in parts], guided) for name in parts[0][1]}
        return context, added

    def _conditioning(self, request: CheckedRequest):
        """(context, added conditioning for the UNet: None, or SDXL's {"text_embeds", "time_ids"})."""
        if self.conditioner is None:
            return self.encode_prompt(request.prompts, request.negatives, request.guidance, request.num_images), None
        context, text_embeds = self.conditioner.encode(
            prompt_loras.without_tags(request.prompts),
            request.negatives,
            request.zero_negatives,
            request.guided,
            request.num_images,
            self.device,
            self.dtype,
            syntax=self.prompt_syntax,
            embeddings=embeddings.library(self.embeddings_dir),
        )
        time_ids = self.conditioner.time_ids(
            request.micro,
            request.mode,
            request.height,
            request.width,
            request.rows,
            request.guided,
            self.device,
            self.dtype,
        )
        return context, {"text_embeds": text_embeds, "time_ids": time_ids}

    def _plan_refiner(self, request: CheckedRequest, scheduler, refiner: Pipeline, refiner_start, callback, progress):
        """(the base's end step, a function that finishes on the refiner), checked before any network runs."""
        end = conditioning.base_end(scheduler, refiner_start)
        refiner_scheduler = make_scheduler(request.scheduler, refiner.scheduler_config)
        refiner_scheduler.set_timesteps(request.steps, device=refiner.device)
        begin = conditioning.refiner_begin(refiner_scheduler, refiner_start)
        if end == 0 or begin >= refiner_scheduler.num_steps:
            raise ValueError(
                f"refiner_start={refiner_start} with {request.steps} steps leaves "
                f"{'the base' if end == 0 else 'the refiner'} no step; move refiner_start or add steps"
            )

        def finish(base_latents: torch.Tensor, generator: torch.Generator) -> list[PIL.Image.Image]:
            lock = contextlib.nullcontext() if refiner is self else refiner._run_lock
            with lock:
                return refiner._refine_locked(
                    base_latents, request, refiner_scheduler, begin, generator, callback=callback, progress=progress
                )

        return end, finish

    def _refine_locked(
        self, base_latents, request: CheckedRequest, scheduler, begin: int, generator, callback, progress
    ) -> list[PIL.Image.Image]:
        """Denoise `base_latents` (a base's, at step `begin`) from `begin` on, as diffusers' img2img with
        denoising_start: no noise is added; ancestral draws continue the base's generator."""
        self.scheduler = scheduler
        scheduler.start_at(begin)
        context, added = self._conditioning(replace(request, mode="img2img"))
        base_latents = base_latents.to(self.device, self.dtype)
        run = latents.DenoiseRun(
            scheduler=scheduler,
            context=context,
            guidance=request.guidance,
            start=begin,
            noise=scheduler.draw_noise(generator, tuple(base_latents.shape), self.dtype, self.device),
            added=added,
            callback=callback,
            progress=progress,
        )
        refined = self.denoise(run, base_latents)
        validation.check_finite(refined, "the refined latents (after the refiner's UNet, before the VAE)")
        return self._finish(self.decode_latents(refined), request)

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
        prompts = prompt_loras.without_tags(prompts)
        if negatives is None:
            negatives = [""] * len(prompts)
        if self.conditioner is not None:  # SDXL: both encoders' penultimate states (no force-zeros here)
            encoded = self.conditioner.encode(
                prompts,
                negatives,
                False,
                guided,
                num_images,
                self.device,
                self.dtype,
                syntax=self.prompt_syntax,
                embeddings=embeddings.library(self.embeddings_dir),
            )
            return encoded[0]
        texts = (list(negatives) if guided else []) + list(prompts)
        labels = ([f"negative prompt {i}" for i in range(len(negatives))] if guided else []) + [
            f"prompt {i}" for i in range(len(prompts))
        ]
        context = encode_prompts(
            self.tokenizer,
            self._prompt_encoder,
            texts,
            syntax=self.prompt_syntax,
            clip_skip=clip_skip,
            labels=labels,
            embeddings=embeddings.library(self.embeddings_dir),
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
        (SD 1/2 pipelines, like diffusers', run it in the model dtype). Exported VAEs stay as exported.
        With VAE graphs the upcast VAE stays fp32 (a cast back and forth would move the weights the
        graphs read, and recapture every request): the fp16 copy's memory again, not a cast per request."""
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
            if self.vae_graphs is None:  # graphed: stays fp32, so the decode graphs keep their weights
                self.vae.to(vae_dtype)

    def denoise(self, run: latents.DenoiseRun, initial: torch.Tensor) -> torch.Tensor:
        """Run steps run.start .. run.end-1 (end: S) of `run.scheduler` (already set up) from `initial`;
        return the final latents. Replays CUDA graphs when the pipeline has them, else steps eagerly."""
        scheduler = run.scheduler
        scheduler.reset()
        added = run.added or {}
        # Issue 15: the context's cross-attention K/V, projected once for all the steps of this run and
        # passed as an added UNet input (a graph runner keeps it in a static buffer). Our UNets only: an
        # exported one takes the context itself.
        if hasattr(self.unet, "project_context"):
            added = {**added, "context_kv": self.unet.project_context(run.context)}
        if self.graphs is not None:
            between_steps = None
            if run.blend is not None or run.callback is not None:

                def between_steps(i, x):
                    return self._after_step(run, i, x)

            return self.graphs.run(
                scheduler,
                initial,
                run.guidance,
                start=run.start,
                end=run.end,
                noise=run.noise,
                inputs=dict(context=run.context, conditioning=run.conditioning, **added),
                between_steps=between_steps,
                progress=lambda steps: tqdm(steps, disable=not run.progress, desc="denoising"),
            )
        stop = scheduler.num_steps if run.end is None else run.end
        x = initial
        for i in tqdm(range(run.start, stop), disable=not run.progress, desc="denoising"):
            noise_i = None if run.noise is None else run.noise[i]
            x = self.denoise_step(scheduler, x, i, run.context, run.guidance, noise_i, run.conditioning, **added)
            x = self._after_step(run, i, x)
        return x

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

        Guided iff `context` has twice the rows of `latents`. `guidance` may be a float, a 0-d device
        tensor (a captured graph keeps it in a buffer) or a [B] fp32 tensor, one scale per latent row (a
        batch of requests with their own scales). `conditioning` (9-channel inpainting: mask and
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
            if isinstance(guidance, torch.Tensor) and guidance.dim() == 1:
                guidance = guidance.view(-1, *([1] * (cond.dim() - 1)))  # [B] -> [B, 1, 1, 1]: one scale per row
            # The product in fp32, rounded once to the model dtype: what a kernel does with a Python float
            # (its opmath), and also what a 0-d or per-row fp32 tensor gives, which in fp16 math would first
            # round 7.3 to 7.30078. So eager (a float), a graph replay (a buffer) and a batch row give the
            # same bits for the same scale.
            scaled = (guidance * (cond - uncond).float()).to(prediction.dtype)
            prediction = uncond + scaled
        return scheduler.step(prediction, i, latents, noise=noise_i)

    def _after_step(self, run: latents.DenoiseRun, i: int, x: torch.Tensor) -> torch.Tensor:
        """Eager work between steps: 4-channel inpainting's blend, then the callback (which may cancel)."""
        scheduler, blend = run.scheduler, run.blend
        if blend is not None:
            known = blend.image_latents
            if i < scheduler.num_steps - 1:
                known = scheduler.add_noise(known, blend.noise, i + 1)
            x = (1 - blend.mask) * known + blend.mask * x
        if run.callback is not None and run.callback(i - run.start, scheduler.timesteps[i], x) is False:
            raise GenerationCancelled(i - run.start, x)
        return x

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1]. If the decode overflows to NaN (fp16 VAEs do), decode
        again with the VAE in fp32 once, with a warning; if that is NaN too, raise rather than return black."""
        scaled = latents / self.vae.config.scaling_factor
        with self._vae_precision() as vae_dtype:
            if self.vae_graphs is None:
                decoded = self.vae.decode(scaled.to(vae_dtype))
            else:  # keyed by the latents' shape and the dtype the VAE runs in (upcast or not)
                decoded = self.vae_graphs(scaled.to(vae_dtype), extra=(vae_dtype,))
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

    def _finish_each(self, decoded: torch.Tensor, requests: list[CheckedRequest]) -> list[list[PIL.Image.Image]]:
        """A batch's decoded images -> one list per request, each with that request's metadata."""
        results, row = [], 0
        for request in requests:
            results.append(self._finish(decoded[row : row + request.rows], request))
            row += request.rows
        return results

    def _finish(self, decoded: torch.Tensor, request: CheckedRequest) -> list[PIL.Image.Image]:
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
            **prompt_loras.metadata(self._loras),
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


def _options_request(method: str, prompt, options: dict, own: tuple[str, ...]) -> GenerationRequest:
    """generate / img2img / inpaint's keywords as a GenerationRequest; image / mask / strength only
    where the method takes them (elsewhere a TypeError, as for any unknown keyword)."""
    misplaced = sorted(name for name in ("image", "mask", "strength") if name in options and name not in own)
    if misplaced:
        raise TypeError(f"{method}() got an unexpected keyword argument {misplaced[0]!r}; see img2img / inpaint")
    return GenerationRequest(prompt, **options)
