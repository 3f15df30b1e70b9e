"""Checks of client fields shared by both APIs: each failure names the field, and becomes a 4xx.

Everything here runs before a request is queued, so a bad request costs no model time.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import secrets

import PIL.Image

from runtime.serve.settings import ServeSettings

RANDOM_SEED = -1  # A1111's and our CLI's "draw one"
SEED_LIMIT = 2**32  # runtime.validation.SEED_LIMIT: torch's CPU generator uses the low 32 bits
VAE_FACTOR = 8


class FieldError(ValueError):
    """A client field that cannot be used: `field` names it, `status` is the HTTP status to answer."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):  # multipart forms send text
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FieldError(name, f"must be an integer, got {value!r:.60}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise FieldError(name, f"must be {bound}, got {value}")
    return value


def number(body: dict, name: str, default: float | None, low: float, high: float, low_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise FieldError(name, f"must be a number, got {value!r:.60}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value!r:.60}")
    if value < low or value > high or (low_open and value == low):
        raise FieldError(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
    return float(value)


def text(body: dict, name: str, default: str | None, settings: ServeSettings, required: bool = False):
    value = body.get(name, default)
    if value is None:
        if required:
            raise FieldError(name, "is required")
        return None
    if not isinstance(value, str):
        raise FieldError(name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise FieldError(name, "must not be empty")
    if len(value) > settings.max_prompt_chars:
        raise FieldError(name, f"is {len(value)} characters; at most {settings.max_prompt_chars}")
    return value


def seed(body: dict, name: str = "seed") -> int:
    """The client's seed, or one drawn here for -1 / absent (so the response can report it)."""
    value = integer(body, name, RANDOM_SEED, RANDOM_SEED, SEED_LIMIT - 1)
    return secrets.randbelow(SEED_LIMIT) if value == RANDOM_SEED else value


def check_size(width: int, height: int, settings: ServeSettings, field: str, sides=None) -> tuple[int, int]:
    """sides: the (width, height) field names where the client sends them apart (A1111), else `field`."""
    for index, (side, value) in enumerate((("width", width), ("height", height))):
        if value < VAE_FACTOR or value % VAE_FACTOR:
            name = sides[index] if sides else field
            raise FieldError(name, f"{side} must be a positive multiple of {VAE_FACTOR}, got {value}")
    if width * height > settings.max_pixels:
        raise FieldError(
            field, f"{width}x{height} is {width * height:,} pixels; this server allows {settings.max_pixels:,}"
        )
    return width, height


def size_text(value, settings: ServeSettings, field: str = "size") -> tuple[int, int] | None:
    """OpenAI's "WxH" (or "auto" / absent: None, the model's or the image's own size)."""
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if match is None:
        raise FieldError(field, f"must be WIDTHxHEIGHT such as 512x512, got {value!r:.60}")
    return check_size(int(match[1]), int(match[2]), settings, field)


def image_bytes(data: bytes, field: str, settings: ServeSettings) -> PIL.Image.Image:
    """Decode an uploaded image; refuse what is too large or not an image before decoding pixels."""
    if len(data) > settings.max_upload_bytes:
        raise FieldError(
            field, f"is {len(data):,} bytes; this server accepts at most {settings.max_upload_bytes:,}", status=413
        )
    if not data:
        raise FieldError(field, "is empty; send a PNG or JPEG image")
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            # the header's size, checked before the pixels are decoded (a small file may claim a huge image)
            if width * height > 4 * settings.max_pixels:
                raise FieldError(field, f"is {width}x{height}; too large for this server", status=413)
            opened.load()
            return opened.copy()
    except FieldError:
        raise
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise FieldError(field, f"is not a readable image ({type(err).__name__}: {str(err)[:120]})") from None


def image_base64(value, field: str, settings: ServeSettings) -> PIL.Image.Image:
    """A1111's images: base64 text, optionally as a data URL (data:image/png;base64,...)."""
    if not isinstance(value, str):
        raise FieldError(field, f"must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > settings.max_upload_bytes * 4 // 3 + 4:
        raise FieldError(field, f"is larger than this server's {settings.max_upload_bytes:,} bytes", status=413)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None
    return image_bytes(data, field, settings)


def image_size(image: PIL.Image.Image, settings: ServeSettings, field: str) -> tuple[int, int]:
    """An uploaded image's size rounded down to the VAE factor, checked as a requested size would be."""
    width, height = (side - side % VAE_FACTOR for side in image.size)
    return check_size(width, height, settings, field)


def check_strength(steps: int, strength: float | None, field: str) -> None:
    """img2img runs int(steps * strength) steps: none at all is a client error, named here."""
    if strength is not None and int(steps * strength) < 1:
        raise FieldError(field, f"{strength:g} with {steps} steps leaves no denoising step; raise it or the steps")
