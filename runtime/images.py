"""Images in and out of the pipeline: PIL <-> tensors, inpainting masks, PNG files with metadata, PSNR.

The conversions follow diffusers' VaeImageProcessor exactly (Lanczos resize, [0,1] -> [-1,1], mask
binarised at 0.5, `round()` to uint8), so our outputs can be compared with diffusers' bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch

# A1111's names for our samplers, so its tools (and people) read our PNG metadata as they expect.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "lcm": "LCM",
}


def load_image(source, what: str = "image") -> PIL.Image.Image:
    """A PIL image from a PIL image or a file path; a clear error naming the file otherwise."""
    if isinstance(source, PIL.Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a PIL.Image or a file path, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise ValueError(f"{what} file {path} is not a readable image ({err})") from None


def image_to_tensor(image: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, height, width] float32 in [-1, 1]; resized with Lanczos if its size differs (as diffusers)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=PIL.Image.LANCZOS)
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 1, height, width] float32 of 0/1; 1 marks the pixels to repaint. The rule, per mode:

    - an alpha channel that is not uniformly opaque (RGBA, LA, PA, P with transparency) is the mask:
      opaque = repaint, transparent = keep, whatever the colour (a brush on a transparent layer, black
      or white, marks what it covers; a fully transparent mask repaints nothing);
    - otherwise the gray level, scaled by the mode's range: 1, L, P, RGB by 255 (as diffusers' mask
      processor: resized in the mask's own mode, then grayscale), I;16* and I (16-bit PNGs) by 65535,
      F (float) taken as given, 0..1;
    then values >= 0.5 repaint.
    """
    fraction = _mask_fraction(mask)
    if fraction is None:  # 8-bit gray or colour, no alpha: exactly diffusers' processing
        if mask.size != (width, height):
            mask = mask.resize((width, height), resample=PIL.Image.LANCZOS)
        array = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    else:
        if fraction.size != (width, height):
            fraction = fraction.resize((width, height), resample=PIL.Image.LANCZOS)
        array = np.array(fraction, dtype=np.float32)
    tensor = torch.from_numpy(array)[None, None]
    return (tensor >= 0.5).to(torch.float32)


_MASK_RANGES = {"I": 65535.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "F": 1.0}


def _mask_fraction(mask: PIL.Image.Image) -> PIL.Image.Image | None:
    """The mask as an F-mode image of values in [0, 1] when its mode needs more than an 8-bit gray
    conversion (alpha, 16-bit, float), else None."""
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = mask.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return PIL.Image.fromarray(np.asarray(alpha, dtype=np.float32) / 255.0, mode="F")
        return None
    if mask.mode in _MASK_RANGES:
        values = np.asarray(mask).astype(np.float32) / _MASK_RANGES[mask.mode]
        if mask.mode == "F" and not np.isfinite(values).all():
            raise ValueError("mask holds NaN or inf values; a float mask must hold values in [0, 1]")
        return PIL.Image.fromarray(values, mode="F")
    if mask.mode not in ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(f"mask mode {mask.mode!r} is not supported; use a grayscale, RGB(A), 16-bit or float image")
    return None


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> [0, 1], clamped, in the same dtype (diffusers clamps before upcasting)."""
    return (images * 0.5 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8, rounded as diffusers' numpy_to_pil."""
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype(np.uint8)


class GeneratedImage(PIL.Image.Image):
    """A PIL image whose `save` as PNG writes the text entries of its `info` (the generation parameters).

    PIL itself writes no `info` on save, so `image.save("fox.png")` on a plain image loses them. An explicit
    `pnginfo=` is written as given. Derived images (`copy()`, `resize()`, ...) are plain PIL images again.
    """

    @classmethod
    def of(cls, image: PIL.Image.Image) -> GeneratedImage:
        generated = cls()
        generated.__dict__.update(image.__dict__)
        generated.info = dict(image.info)
        return generated

    def save(self, fp, format=None, **params):
        if "pnginfo" not in params and _saves_as_png(fp, format):
            params["pnginfo"] = png_text_info({k: v for k, v in self.info.items() if isinstance(v, str)})
        return super().save(fp, format, **params)


def _saves_as_png(fp, format) -> bool:
    if format is not None:
        return format.upper() == "PNG"
    if isinstance(fp, (str, os.PathLike)):
        return PIL.Image.registered_extensions().get(Path(fp).suffix.lower()) == "PNG"
    return False


def to_pil(images: torch.Tensor) -> list[GeneratedImage]:
    """[B, 3, H, W] floats in [0, 1] -> a list of RGB PIL images (GeneratedImage: PNG saves keep `info`)."""
    return [GeneratedImage.of(PIL.Image.fromarray(array)) for array in to_uint8(images)]


def _as_float_array(image) -> tuple[np.ndarray, float]:
    """An image as a float64 array and its peak value: 255 for uint8 / PIL images, else 1.0."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    peak = 255.0 if image.dtype == np.uint8 else 1.0
    return image.astype(np.float64), peak


def psnr(a, b, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (inf when identical).

    Accepts PIL images, numpy arrays or tensors. The peak is 255 for uint8 inputs and 1.0 for floats
    (images in [0, 1]) unless given.
    """
    array_a, peak_a = _as_float_array(a)
    array_b, peak_b = _as_float_array(b)
    if array_a.shape != array_b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {array_a.shape} and {array_b.shape}")
    if peak is None:
        if peak_a != peak_b:
            raise ValueError("psnr of a uint8 image and a float image: convert one or pass peak=")
        peak = peak_a
    mse = float(np.mean((array_a - array_b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


@dataclass(frozen=True)
class GenerationInfo:
    """What produced an image; written into its PNG text chunks and kept in `image.info`."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    width: int
    height: int
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    strength: float | None = None  # img2img / inpaint only
    model: str | None = None
    batch_index: int = 0  # position in a batch drawn from one seed
    model_hash: str | None = None  # A1111's short hash (runtime/model_hash.py)
    backend: str | None = None  # what ran the networks: torch, triton, onnxruntime, tensorrt
    dtype: str | None = None  # the networks' dtype: fp32, fp16, bf16
    loras: str | None = None  # the LoRAs applied, "name: scale, ..." (runtime/prompt_loras.py)
    lora_hashes: str | None = None  # A1111's "Lora hashes": "name: hash, ..." (runtime/model_hash.py)

    def parameters_text(self) -> str:
        """The A1111-style "parameters" text (prompt, negative prompt line, then key: value pairs)."""
        fields = [
            ("Steps", self.steps),
            ("Sampler", A1111_SAMPLER_NAMES.get(self.scheduler, self.scheduler)),
            ("CFG scale", self.guidance),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
        ]
        if self.strength is not None:
            fields.append(("Denoising strength", self.strength))
        if self.model_hash:
            fields.append(("Model hash", self.model_hash))
        if self.model:
            fields.append(("Model", self.model))
        if self.batch_index:
            fields.append(("Batch pos", self.batch_index))
        if self.lora_hashes:
            fields.append(("Lora hashes", self.lora_hashes))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {_a1111_quote(value)}" for key, value in fields))
        return "\n".join(lines)

    def as_text_chunks(self) -> dict[str, str]:
        """ "parameters" plus one text entry per field (absent optional fields left out)."""
        chunks = {"parameters": self.parameters_text()}
        for key, value in self.__dict__.items():
            if value is not None:
                chunks[key] = str(value)
        return chunks


def _a1111_quote(value) -> str:
    """A1111's infotext quoting (modules/infotext_utils.quote): a value holding a comma, colon or newline
    is written as a JSON string, so its PNG Info parser reads it back whole."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds.

    A failed or interrupted write never leaves a partial file at `path` (nor a stray temp file).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp_name)
        os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp makes files owner-only; give the usual mode
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def png_text_info(text_chunks: dict[str, str]) -> PIL.PngImagePlugin.PngInfo:
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    return info


def save_pngs(images: list[PIL.Image.Image], paths: list, text_chunks: list[dict[str, str]]) -> list[Path]:
    """Write several PNGs all-or-nothing: each goes to a temp file first; files are moved into place
    only once every one has been written, so a failure leaves none of them half-written."""
    if not len(images) == len(paths) == len(text_chunks):
        raise ValueError(f"save_pngs got {len(images)} images, {len(paths)} paths, {len(text_chunks)} metadata")
    for path in map(Path, paths):  # all targets checked before the first is written
        if path.exists() and not path.is_file():
            raise IsADirectoryError(f"output {path} exists and is not a file; nothing was written")
    with contextlib.ExitStack() as stack:
        temp_paths = [stack.enter_context(atomic_output(path)) for path in paths]
        for image, temp_path, chunks in zip(images, temp_paths, text_chunks):
            image.save(temp_path, format="PNG", pnginfo=png_text_info(chunks))
    return [Path(path) for path in paths]


def save_png(image: PIL.Image.Image, path, text_chunks: dict[str, str] | None = None) -> Path:
    """Write `image` as a PNG with `text_chunks` as tEXt entries, atomically (see atomic_output)."""
    return save_pngs([image], [path], [text_chunks or {}])[0]
