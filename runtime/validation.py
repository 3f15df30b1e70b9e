"""Checks of one generation request that run before any network does, and of tensors between stages.

Kept apart from pipeline.py so the pipeline calls each in a line: what a caller may ask for (sizes,
counts, seeds, callbacks, prompt text), and where a non-finite value first appears.
"""

from __future__ import annotations

import math
import threading

import torch

# torch's CPU generator (mt19937) is seeded from the low 32 bits of manual_seed's argument, although
# initial_seed() reports all 64: seeds 0 and 2**32 give the same noise. Only seeds that give distinct
# images are accepted, so the seed a PNG records always reproduces it.
SEED_LIMIT = 2**32
# Above this many pixels per image a run is refused unless the caller raises the limit
# (Pipeline.max_pixels, CLI --max-pixels): 2048 x 2048, four times SDXL's native size.
DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_IMAGES_PER_CALL = 64  # prompts x num_images in one batch


def check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"seed must be an integer in [0, 2**32), got {seed!r:.40}: torch's CPU generator "
            f"uses only the low 32 bits, so larger seeds would repeat smaller ones' images"
        )


def check_batch(prompts: int, num_images: int) -> None:
    if prompts * num_images > MAX_IMAGES_PER_CALL:
        raise ValueError(
            f"{prompts} prompt(s) x num_images={num_images} is {prompts * num_images} images in "
            f"one batch; at most {MAX_IMAGES_PER_CALL} per call (call again for more)"
        )


def check_prompt_text(texts: list[str], name: str) -> None:
    """Text the tokenizer can encode: a lone surrogate (undecodable bytes from argv or a file read
    with errors="surrogateescape") is named with its position instead of a tokenizer TypeError."""
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{name} {index} is not valid Unicode text: character {error.start} is "
                f"{text[error.start]!r} (bytes that were not UTF-8); re-encode the prompt "
                f"as UTF-8"
            ) from None


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be callable (step_index, timestep, latents) -> bool | None, got {type(callback).__name__}"
        )


def estimated_bytes(width: int, height: int, batch: int, guided: bool, element_size: int) -> int:
    """A rough peak of one UNet step: the self-attention scores of the first level, [rows, 8 heads,
    N, N] with N latent pixels, which dominates at large sizes where attention is not fused, plus
    the VAE decoder's widest activation ([batch, 128, H, W] twice, fp32)."""
    tokens = (width // 8) * (height // 8)
    rows = batch * (2 if guided else 1)
    return rows * 8 * tokens * tokens * element_size + batch * 2 * 128 * width * height * 4


def check_pixels(width: int, height: int, batch: int, guided: bool, element_size: int, max_pixels) -> None:
    if max_pixels is None or width * height <= max_pixels:
        return
    gib = estimated_bytes(width, height, batch, guided, element_size) / 2**30
    raise ValueError(
        f"{width}x{height} is {width * height:,} pixels per image, above the limit of "
        f"{max_pixels:,} (max_pixels); a run at this size needs an estimated {gib:,.1f} GiB and "
        f"a long time. Raise the limit (Pipeline.max_pixels, --max-pixels) to run it anyway"
    )


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise FloatingPointError naming `what` if `tensor` holds NaN or +-inf (one host sync)."""
    if not bool(torch.isfinite(tensor).all()):
        kinds = [
            name
            for name, found in (
                ("NaN", torch.isnan(tensor).any()),
                ("+inf", torch.isposinf(tensor).any()),
                ("-inf", torch.isneginf(tensor).any()),
            )
            if bool(found)
        ]
        raise FloatingPointError(f"{what} holds {' and '.join(kinds)}")


class ReentryGuard:
    """One run at a time per pipeline: other threads wait; the running thread itself (a callback that
    calls generate again) gets an error instead of waiting forever on its own lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self):
        if self._owner == threading.get_ident():
            raise RuntimeError(
                "a pipeline call was made from inside its own run (e.g. from the step "
                "callback); the pipeline runs one request at a time, so this would wait "
                "forever. Start the next call after this one returns"
            )
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
