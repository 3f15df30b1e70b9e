"""diffusers' own StableDiffusionPipeline (SDPA attention, eager) as a baseline row of the benchmark;
StableDiffusionXLPipeline for SDXL models. The `diffusers-compile` row is the same pipeline with its UNet
under torch.compile as diffusers' docs set it up (the row users would pick instead of eager); opt-in by
its name in --backends, as a compile takes minutes on a CPU.

It loads the same diffusers folder our backends load and answers the calls the benchmark makes of a
Pipeline (generate, encode_prompt, decode_latents), so it is measured in exactly the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from runtime.schedulers import diffusers_equivalent
from runtime.weights import resolve_dtype


class DiffusersBaseline:
    def __init__(self, pipe, device: str):
        self.pipe, self.device = pipe, device
        self.dtype = pipe.unet.dtype
        self.vae, self.vae_scale_factor = pipe.vae, pipe.vae_scale_factor
        self._default_scheduler = pipe.scheduler

    def _set_scheduler(self, name: str | None) -> None:
        if name is None:
            self.pipe.scheduler = self._default_scheduler
            return
        import diffusers

        class_name, overrides = diffusers_equivalent(name)  # the sampler our rows run
        self.pipe.scheduler = getattr(diffusers, class_name).from_config(self._default_scheduler.config, **overrides)

    @torch.inference_mode()
    def encode_prompt(self, prompts, negatives, guidance, num_images=1):
        if isinstance(self.pipe, _sdxl_class()):  # keywords: its positional order differs from SD's
            return self.pipe.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=num_images,
                do_classifier_free_guidance=guidance > 1,
                negative_prompt=negatives,
            )
        return self.pipe.encode_prompt(prompts, self.device, num_images, guidance > 1, negatives)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor).sample

    def generate(
        self,
        prompt,
        *,
        negative_prompt,
        steps,
        guidance,
        width,
        height,
        seed,
        num_images,
        scheduler=None,
        progress=False,
        callback=None,
    ) -> list[PIL.Image.Image]:
        self._set_scheduler(scheduler)
        self.pipe.set_progress_bar_config(disable=not progress)

        def on_step_end(_pipe, i, t, kwargs):
            if callback is not None:
                callback(i, t, kwargs["latents"])
            return kwargs

        output = self.pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            num_images_per_prompt=num_images,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback_on_step_end=on_step_end,
        )
        return [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in output.images]


def _sdxl_class():
    import diffusers

    return diffusers.StableDiffusionXLPipeline


BASELINE = "diffusers"
COMPILED = "diffusers-compile"
ROWS = (BASELINE, COMPILED)


def compile_unet(unet, device: str):
    """torch.compile as diffusers' torch 2.0 guide sets it: channels_last, "reduce-overhead" (CUDA graphs)
    on a GPU. No inductor config flags: those are process-wide and would change every other row too."""
    if device.startswith("cuda"):
        unet = unet.to(memory_format=torch.channels_last)
        return torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    return torch.compile(unet, fullgraph=True)


def diffusers_pipeline(master, config, compiled: bool = False) -> DiffusersBaseline:
    """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) with the master's weights, in
    config.dtype on config.device, its UNet under torch.compile if `compiled`: loaded from the master's
    diffusers folder, or, where that folder holds no weight files (random weights built in memory), built
    from its configs and the master networks' state dicts (our networks use diffusers' and transformers'
    keys)."""
    import diffusers

    source = Path(master.source)
    if not source.is_dir():
        raise ValueError(f"the diffusers baseline loads diffusers folders; {master.source} is a single file")
    dtype = resolve_dtype(config.dtype)
    if master.kind == "sdxl-refiner":
        raise ValueError("the diffusers baseline times SDXL bases; a refiner alone has no txt2img pipeline")
    if any((source / "unet").glob("*.safetensors")) or any((source / "unet").glob("*.bin")):
        if master.kind == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(master.source, torch_dtype=dtype)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                master.source,
                torch_dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    else:
        pipe = _pipeline_from_master(master, source)
    pipe.to(config.device, dtype)
    baseline = DiffusersBaseline(pipe, config.device)  # reads the UNet's dtype before it is wrapped
    if compiled:
        pipe.unet = compile_unet(pipe.unet, config.device)  # compiles lazily: the first step pays for it
    return baseline


def _pipeline_from_master(master, source: Path):
    import diffusers
    import transformers

    def config(name: str) -> dict:
        return json.loads((source / name / "config.json").read_text())

    unet = diffusers.UNet2DConditionModel.from_config(config("unet"))
    vae = diffusers.AutoencoderKL.from_config(config("vae"))
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config("text_encoder")))
    pairs = [(unet, master.unet), (vae, master.vae), (text_encoder, master.text_encoder)]
    if master.kind == "sdxl":
        text_config_2 = transformers.CLIPTextConfig(**config("text_encoder_2"))
        text_encoder_2 = transformers.CLIPTextModelWithProjection(text_config_2)
        pairs.append((text_encoder_2, master.text_encoder_2))
    for theirs, ours in pairs:
        # strict: a key either side lacks would leave a network at its init and time the wrong model
        theirs.load_state_dict({k: v.detach().float().cpu() for k, v in ours.state_dict().items()}, strict=True)
    scheduler_class = getattr(diffusers, master.scheduler_config["_class_name"])
    if master.kind == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.eval(),
            text_encoder_2=text_encoder_2.eval(),
            unet=unet.eval(),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(str(source / "tokenizer")),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(source / "tokenizer_2")),
            scheduler=scheduler_class.from_config(dict(master.scheduler_config)),
            force_zeros_for_empty_prompt=bool(master.pipeline_config.get("force_zeros_for_empty_prompt", True)),
        )
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(source / "tokenizer")),
        scheduler=scheduler_class.from_config(dict(master.scheduler_config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
