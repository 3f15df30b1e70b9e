"""AUTOMATIC1111's /sdapi/v1: txt2img, img2img (inpainting with `mask`), samplers, sd-models, loras,
embeddings, options, progress, interrupt, with A1111's field names and its `info` JSON. `<lora:NAME:W>`
and embeddings in prompts: runtime/serve/extra_networks.py.

Seeds: A1111 gives image k of a request seed + k; here each of the n_iter iterations is one request with
seed + iteration, whose batch_size images come from that one seed (our pipeline's num_images, as the
CLI's --num-images), so all_seeds lists each image's iteration seed and its PNG its `batch_index`.
Fields A1111 has and this server does not implement (hires fix, restore_faces, scripts, ...) are ignored
when at their A1111 defaults; `mask_blur` and `inpainting_fill` are ignored (the mask is used as sent).
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from runtime.images import A1111_SAMPLER_NAMES
from runtime.serve import extra_networks, fields
from runtime.serve.a1111_names import OURS_BY_A1111, scheduler_from_client
from runtime.serve.fields import FieldError
from runtime.serve.http_input import json_object
from runtime.serve.params import GenerationParams
from runtime.serve.service import Model, Service, png_base64

_DEFAULT_STEPS = 20  # A1111's defaults
_DEFAULT_CFG = 7.0
_DEFAULT_STRENGTH = 0.75
_IMAGE_FIELDS = ("init_images", "mask")
# A1111 fields whose non-default values ask for work this server does not do: refused, not ignored.
_UNSUPPORTED = {"enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0}


def router(service: Service) -> APIRouter:
    routes = APIRouter(prefix="/sdapi/v1")
    settings = service.settings

    @routes.post("/txt2img")
    async def txt2img(request: Request):
        body = await json_object(request, settings)
        model, params = _parse(body, service)
        results = await service.run(model, params, request.is_disconnected)
        return _response(body, params, results, model)

    @routes.post("/img2img")
    async def img2img(request: Request):
        body = await json_object(request, settings)
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise FieldError("init_images", "must be a list of one base64 image")
        image = fields.image_base64(images[0], "init_images", settings)
        mask = None
        if body.get("mask") is not None:
            mask = fields.image_base64(body["mask"], "mask", settings)
            if mask.size != image.size:
                raise FieldError("mask", f"is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}")
            if fields.integer(body, "inpainting_mask_invert", 0, 0, 1):
                mask = mask.convert("L").point(lambda value: 255 - value)
        strength = fields.number(body, "denoising_strength", _DEFAULT_STRENGTH, 0.0, 1.0, low_open=True)
        model, params = _parse(body, service, image=image, mask=mask, strength=strength)
        results = await service.run(model, params, request.is_disconnected)
        return _response(body, params, results, model)

    @routes.get("/samplers")
    async def samplers():
        return [{"name": name, "aliases": [ours], "options": {}} for name, ours in OURS_BY_A1111.items()]

    @routes.get("/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic"}, {"name": "karras", "label": "Karras"}]

    @routes.get("/sd-models")
    async def sd_models():
        return [
            {
                "title": _title(m),
                "model_name": m.name,
                "hash": m.hash,
                "sha256": None,
                "filename": m.name,
                "config": None,
            }
            for m in service.models.values()
        ]

    @routes.get("/loras")
    async def lora_list():
        return extra_networks.lora_listing(service.models[service.default_model].pipeline)

    @routes.get("/embeddings")
    async def embedding_list():
        return extra_networks.embedding_listing(service.models[service.default_model].pipeline)

    @routes.post("/refresh-loras")
    async def refresh_loras():  # the listing and the tags read the folder as it is now: nothing to reload
        return {}

    @routes.get("/options")
    async def get_options():
        return {"sd_model_checkpoint": _title(service.models[service.default_model])}

    @routes.post("/options")
    async def set_options(request: Request):
        body = await json_object(request, settings)
        if "sd_model_checkpoint" in body:
            service.default_model = _model(service, body["sd_model_checkpoint"], "sd_model_checkpoint").name
        return None

    @routes.get("/progress")
    async def progress():
        model = service.models[service.default_model]
        state = model.batcher.progress
        running = state.running > 0
        fraction = state.step / state.steps if running and state.steps else 0.0
        return {
            "progress": min(fraction, 1.0),
            "eta_relative": 0.0,
            "state": {
                "skipped": False,
                "interrupted": False,
                "job": "generation" if running else "",
                "job_count": model.batcher.queue_depth + state.running,
                "job_timestamp": "",
                "job_no": state.batches_run,
                "sampling_step": state.step if running else 0,
                "sampling_steps": state.steps if running else 0,
            },
            "current_image": None,
            "textinfo": None,
        }

    @routes.post("/interrupt")
    async def interrupt():
        for model in service.models.values():
            service.metrics.cancelled.labels("interrupted").inc(model.batcher.interrupt())
        return None

    @routes.get("/scripts")
    async def scripts():  # webuiapi asks at start which extensions exist: none
        return {"txt2img": [], "img2img": []}

    return routes


def _title(model: Model) -> str:
    return f"{model.name} [{model.hash}]" if model.hash else model.name


def _model(service: Service, value, field: str) -> Model:
    """A model by A1111's title ("name [hash]") or by name; only configured ones."""
    for model in service.models.values():
        if value in (model.name, _title(model)):
            return model
    return service.model(value, field)


def _parse(body: dict, service: Service, image=None, mask=None, strength=None) -> tuple[Model, list]:
    settings = service.settings
    for name, default in _UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise FieldError(name, f"is not supported by this server (send {default!r} or leave it out)")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise FieldError("override_settings", "must be an object")
    if overrides.get("sd_model_checkpoint"):
        model = _model(service, overrides["sd_model_checkpoint"], "override_settings.sd_model_checkpoint")
    else:
        model = service.models[service.default_model]
    if "width" in body or "height" in body or image is None:
        native = model.pipeline.native_size()
        width = fields.integer(body, "width", native[0], 1, 1 << 16)
        height = fields.integer(body, "height", native[1], 1, 1 << 16)
        fields.check_size(width, height, settings, "width", sides=("width", "height"))
    else:
        width, height = fields.image_size(image, settings, "init_images")
    batch_size = fields.integer(body, "batch_size", 1, 1, settings.max_images)
    n_iter = fields.integer(body, "n_iter", 1, 1, settings.max_images)
    if batch_size * n_iter > settings.max_images:
        raise FieldError("n_iter", f"batch_size x n_iter is {batch_size * n_iter}; at most {settings.max_images}")
    sampler = body.get("sampler_name") or body.get("sampler_index")
    scheduler = scheduler_from_client(sampler, "sampler_name", body.get("scheduler"))
    seed = fields.seed(body)
    common = dict(
        prompt=fields.text(body, "prompt", "", settings),
        negative_prompt=fields.text(body, "negative_prompt", None, settings) or None,
        steps=fields.integer(body, "steps", _DEFAULT_STEPS, 1, settings.max_steps),
        guidance=fields.number(body, "cfg_scale", _DEFAULT_CFG, 0.0, 100.0),
        width=width,
        height=height,
        num_images=batch_size,
        scheduler=scheduler,
        image=image,
        mask=mask,
        strength=strength,
    )
    fields.check_strength(common["steps"], strength, "denoising_strength")
    params = [GenerationParams(seed=(seed + index) % fields.SEED_LIMIT, **common) for index in range(n_iter)]
    return model, params


def _response(body: dict, params: list[GenerationParams], results: list[list], model: Model) -> dict:
    images = [image for batch in results for image in batch]
    first = params[0]
    seeds = [p.seed for p, batch in zip(params, results) for _ in batch]
    infotexts = [image.info.get("parameters", "") for image in images]
    info = {
        "prompt": first.prompt,
        "all_prompts": [first.prompt] * len(images),
        "negative_prompt": first.negative_prompt or "",
        "all_negative_prompts": [first.negative_prompt or ""] * len(images),
        "seed": first.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(images),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": A1111_SAMPLER_NAMES.get(images[0].info.get("scheduler"), images[0].info.get("scheduler")),
        "cfg_scale": first.guidance,
        "steps": first.steps,
        "batch_size": first.num_images,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.name,
        "sd_model_hash": model.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": first.mask is not None,
        "version": "sd-runtime",
    }
    parameters = {key: value for key, value in body.items() if key not in _IMAGE_FIELDS}
    send = body.get("send_images", True) is not False
    return {
        "images": [png_base64(image) for image in images] if send else [],
        "parameters": parameters,
        "info": json.dumps(info),
    }
