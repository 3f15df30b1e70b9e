"""OpenAI's Images API: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart), GET /v1/models.

Responses are `b64_json` only (there is no file store to serve URLs from); `n`, `size` ("WxH" or "auto"),
`model` (a configured name) as OpenAI's; our fields through the client's `extra_body`: seed (-1 random),
steps, guidance, negative_prompt, scheduler (our names, or A1111's), strength (edits). OpenAI's
`quality`, `style`, `user`, `background`, `output_format` "png" are accepted and change nothing.
A mask follows OpenAI's rule when it has an alpha channel (transparent = repaint); an opaque grayscale
mask follows ours and A1111's (white = repaint). An edit without a mask is img2img.
"""

from __future__ import annotations

import time

import PIL.Image
from fastapi import APIRouter, Request

from runtime.serve import fields
from runtime.serve.a1111_names import scheduler_from_client
from runtime.serve.fields import FieldError
from runtime.serve.http_input import json_object, multipart_form
from runtime.serve.params import GenerationParams
from runtime.serve.service import Service, png_base64

_DEFAULT_STEPS = 30
_DEFAULT_GUIDANCE = 7.5


def router(service: Service) -> APIRouter:
    routes = APIRouter()
    settings = service.settings

    @routes.post("/v1/images/generations")
    async def generations(request: Request):
        body = await json_object(request, settings)
        model = service.model(body.get("model"))
        size = fields.size_text(body.get("size"), settings) or _native_size(model.pipeline, settings)
        params = _params(body, settings, size)
        images = (await service.run(model, [params], request.is_disconnected))[0]
        return _response(images)

    @routes.post("/v1/images/edits")
    async def edits(request: Request):
        form, files = await multipart_form(request, settings)
        model = service.model(form.get("model"))
        uploads = files.get("image") or []
        if len(uploads) != 1:
            raise FieldError("image", f"send exactly one image file, got {len(uploads)}")
        image = fields.image_bytes(uploads[0], "image", settings)
        mask = None
        if files.get("mask"):
            mask = _openai_mask(fields.image_bytes(files["mask"][0], "mask", settings), image)
        size = fields.size_text(form.get("size"), settings) or fields.image_size(image, settings, "image")
        strength = fields.number(form, "strength", None, 0.0, 1.0, low_open=True)
        params = _params(form, settings, size, image=image, mask=mask, strength=strength)
        images = (await service.run(model, [params], request.is_disconnected))[0]
        return _response(images)

    @routes.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "sd-runtime"} for name in service.models],
        }

    return routes


def _params(body: dict, settings, size, image=None, mask=None, strength=None) -> GenerationParams:
    response_format = body.get("response_format", "b64_json")
    if response_format not in (None, "b64_json"):
        raise FieldError("response_format", f"only b64_json is served (no URLs), got {response_format!r}")
    output_format = body.get("output_format", "png")
    if output_format not in (None, "png"):
        raise FieldError("output_format", f"only png is served (it carries the metadata), got {output_format!r}")
    width, height = size
    steps = fields.integer(body, "steps", _DEFAULT_STEPS, 1, settings.max_steps)
    fields.check_strength(steps, strength, "strength")
    return GenerationParams(
        prompt=fields.text(body, "prompt", None, settings, required=True),
        negative_prompt=fields.text(body, "negative_prompt", None, settings),
        steps=steps,
        guidance=fields.number(body, "guidance", _DEFAULT_GUIDANCE, 0.0, 100.0),
        width=width,
        height=height,
        seed=fields.seed(body),
        num_images=fields.integer(body, "n", 1, 1, settings.max_images),
        scheduler=scheduler_from_client(body.get("scheduler"), "scheduler"),
        image=image,
        mask=mask,
        strength=strength,
    )


def _native_size(pipe, settings) -> tuple[int, int]:
    width, height = pipe.native_size()
    return fields.check_size(width, height, settings, "size")


def _openai_mask(mask: PIL.Image.Image, image: PIL.Image.Image) -> PIL.Image.Image:
    if mask.size != image.size:
        raise FieldError("mask", f"is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}")
    if "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 - value)  # OpenAI: transparent marks what to repaint
    return mask


def _response(images) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": png_base64(image)} for image in images]}
