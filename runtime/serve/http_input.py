"""Reading request bodies within the server's limits: JSON objects and multipart forms, each failure a
4xx naming what was wrong."""

from __future__ import annotations

import json

from starlette.datastructures import UploadFile
from starlette.requests import Request

from runtime.serve.fields import FieldError
from runtime.serve.settings import ServeSettings


def body_limit(settings: ServeSettings) -> int:
    """A whole body: an image and a mask (base64 is 4/3 of the bytes) and the other fields."""
    return 3 * settings.max_upload_bytes + (64 << 10)


def _check_length(request: Request, settings: ServeSettings) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit(settings):
        raise FieldError("body", f"is {int(declared):,} bytes; at most {body_limit(settings):,}", status=413)


async def json_object(request: Request, settings: ServeSettings) -> dict:
    _check_length(request, settings)
    chunks, size = [], 0
    async for chunk in request.stream():  # the declared length may be absent (chunked) or wrong
        size += len(chunk)
        if size > body_limit(settings):
            raise FieldError("body", f"is larger than {body_limit(settings):,} bytes", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FieldError("body", f"is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object, got {type(body).__name__}")
    return body


async def multipart_form(request: Request, settings: ServeSettings) -> tuple[dict, dict[str, list[bytes]]]:
    """(text fields, {file field: [contents]}); `image[]` (the openai client's list form) reads as `image`."""
    _check_length(request, settings)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise FieldError("body", f"must be multipart/form-data (an image upload), got {content_type or 'none'!r}")
    try:
        form = await request.form(max_files=8, max_fields=64, max_part_size=1 << 20)
    except Exception as err:  # starlette's MultiPartException and parser errors
        raise FieldError("body", f"is not a readable multipart form ({err})") from None
    fields, files = {}, {}
    try:
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            if isinstance(value, UploadFile):
                if value.size is not None and value.size > settings.max_upload_bytes:
                    raise FieldError(
                        name, f"is {value.size:,} bytes; at most {settings.max_upload_bytes:,}", status=413
                    )
                files.setdefault(name, []).append(await value.read(settings.max_upload_bytes + 1))
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files
