"""A1111's short model hash, for the "Model hash" field of PNG metadata.

A single-file checkpoint: the first 10 hex digits of the sha256 of the file (what A1111 >= 1.0 writes, so
its PNG Info and civitai match it). A diffusers folder has no such hash; its equivalent here is the first 10
hex digits of one sha256 over its weight files (*.safetensors, *.bin, *.ckpt, *.pt, *.pth under unet/,
vae/, text_encoder/), each fed as its relative path then its bytes, in sorted path order. Hashes are
remembered per (path, size, modification time): a checkpoint is read once per process.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

HASH_DIGITS = 10
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
_BLOCK = 1 << 20


def model_hash(source) -> str | None:
    """The short hash of a checkpoint file or diffusers folder; None when `source` is neither."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            (
                p
                for folder in _WEIGHT_FOLDERS
                if (path / folder).is_dir()
                for p in (path / folder).iterdir()
                if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    else:
        return None
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash(str(path), path.is_dir(), stamps)


@functools.lru_cache(maxsize=16)
def _hash(root: str, is_folder: bool, stamps: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        if is_folder:
            digest.update(Path(name).relative_to(root).as_posix().encode())
        with open(name, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()[:HASH_DIGITS]


LORA_HASH_DIGITS = 12


def lora_hash(path) -> str:
    """A1111's short hash of a LoRA (extensions-builtin/Lora: `shorthash`, written as "Lora hashes"): the
    file's own `sshs_model_hash` metadata if it has one, else the sha256 of the safetensors payload (the
    bytes after the 8-byte length and the JSON header: kohya's / sd-webui-additional-networks' "addnet"
    hash, so renaming or re-tagging a file keeps it), first 12 hex digits. Remembered per (path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    return _lora_hash(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _lora_hash(name: str, size: int, mtime_ns: int) -> str:
    import json

    digest = hashlib.sha256()
    if not name.endswith(".safetensors"):  # A1111 hashes other files whole
        with open(name, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
        return digest.hexdigest()[:LORA_HASH_DIGITS]
    with open(name, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_length) or b"{}")
        stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
        if isinstance(stored, str) and stored:
            return stored[:LORA_HASH_DIGITS]
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()[:LORA_HASH_DIGITS]
