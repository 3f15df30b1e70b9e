"""A1111's extra networks over HTTP: LoRAs (`<lora:NAME:WEIGHT>` in a request's prompt, resolved in the
server's `--lora-dir`; runtime/prompt_loras.py applies them per denoising loop) and textual-inversion
embeddings (`--embeddings-dir`, runtime/embeddings.py), and their listings `GET /sdapi/v1/loras` and
`GET /sdapi/v1/embeddings`.

Clients name LoRAs, never paths: a tag is checked here, before the request is queued, against the names
the folder holds, and the answer names the tag and those names but not the server's folder. Requests that
name other LoRAs (or weights) get other batch keys, so they never share a loop.
"""

from __future__ import annotations

from pathlib import Path

from runtime import embeddings, prompt_loras
from runtime.serve.fields import FieldError


def check_prompt(pipe, prompt: str, field: str = "prompt") -> None:
    """FieldError (400) for a `<lora:...>` tag this server cannot apply; nothing for a prompt without tags."""
    try:
        tags = prompt_loras.find_tags(prompt)
    except prompt_loras.PromptLoraError as err:
        raise FieldError(field, str(err)) from None
    if not tags:
        return
    if pipe.lora_dir is None:
        raise FieldError(field, f"{tags[0].tag}: this server has no LoRAs (it was started without --lora-dir)")
    for tag in tags:
        try:
            prompt_loras.resolve(tag.name, pipe.lora_dir)
        except prompt_loras.PromptLoraError:
            listing = ", ".join(prompt_loras.available(pipe.lora_dir)) or "none"
            raise FieldError(field, f"{tag.tag}: unknown LoRA {tag.name!r}; this server has: {listing}") from None


def lora_listing(pipe) -> list[dict]:
    """A1111's /sdapi/v1/loras: name, alias, path (the file's name only: the folder stays on the server)
    and the file's `__metadata__` (training tags and the like; {} where it has none or cannot be read)."""
    if pipe.lora_dir is None:
        return []
    entries = []
    for name in prompt_loras.available(pipe.lora_dir):
        try:
            path = prompt_loras.resolve(name, pipe.lora_dir)  # skips links that lead out of the folder
        except prompt_loras.PromptLoraError:
            continue
        entries.append({"name": name, "alias": name, "path": path.name, "metadata": _metadata(path)})
    return entries


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 -- a damaged file is listed (A1111 does too); using it gives the error
        return {}


def embedding_listing(pipe) -> dict:
    """A1111's /sdapi/v1/embeddings: {"loaded": {name: {"shape", "vectors", ...}}, "skipped": {name: ...}},
    skipped being the files this model cannot use (another family's width, or unreadable)."""
    loaded, skipped = {}, {}
    library = embeddings.library(pipe.embeddings_dir)
    for name in [] if library is None else library.names():
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        try:
            embedding = library.get(name)
            for encoder, key in _text_encoders(pipe.components):
                embedding.for_encoder(encoder.config.hidden_size, key)
        except (embeddings.EmbeddingError, OSError):
            skipped[name] = entry
            continue
        width = next(iter(embedding.vectors.values())).shape[1]
        loaded[name] = {**entry, "shape": width, "vectors": embedding.count}
    return {"loaded": loaded, "skipped": skipped}


def _text_encoders(components) -> list[tuple[object, str | None]]:
    """(encoder, the part of an embedding file it reads): SDXL's encoders read clip_l / clip_g."""
    if components.kind not in ("sdxl", "sdxl-refiner"):
        return [(components.text_encoder, None)]
    pairs = zip((components.text_encoder, components.text_encoder_2), embeddings.SDXL_KEYS)
    return [(encoder, key) for encoder, key in pairs if encoder is not None]
