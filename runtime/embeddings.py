"""Textual-inversion embeddings as A1111 reads them: a folder of NAME.safetensors, used in prompts by name.

    library = EmbeddingLibrary("embeddings/")      # style.safetensors, ...
    encode_prompts(tokenizer, text_encoder, ["a fox, style"], embeddings=library)

Files (A1111's modules/textual_inversion/textual_inversion.py, load_from_file): the vectors [n, C] under
`emb_params` (A1111's own .safetensors), `string_to_param.*` (its .pt layout, flattened), any single
tensor (diffusers' learned_embeds: {token: [C] or [n, C]}), or SDXL's `clip_l` [n, 768] + `clip_g`
[n, 1280]. A name is the file's stem. In a prompt the bare name is found by its tokens (as A1111 matches
the name's token ids, the longest name first), and `<name>` is the same with the brackets dropped.
An n-vector embedding takes n token slots, with the weight of the text it stands in (runtime/
prompt_syntax.py chunks the prompt so that the n slots never straddle two chunks); its vectors replace
those slots' token embeddings, before the position embeddings are added (A1111's EmbeddingsWithFixes,
diffusers' load_textual_inversion), so the other positions' inputs are unchanged.
Only prompts read with the a1111 syntax use embeddings; `plain` reads the text as it is.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDING_SUFFIX = ".safetensors"
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's two encoders, in encoder order
_STRING_TO_PARAM = "string_to_param."


class EmbeddingError(ValueError):
    """An embedding file or use that cannot work; the message names the file."""


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict[str, torch.Tensor]  # "*" -> [n, C]; SDXL: "clip_l", "clip_g" -> [n, C_encoder]
    path: Path

    @property
    def count(self) -> int:
        """Token slots it takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]

    def for_encoder(self, width: int, key: str | None = None) -> torch.Tensor:
        """The vectors for a text encoder `width` wide; key: "clip_l" / "clip_g" for SDXL's encoders."""
        if key is None and "*" not in self.vectors:
            raise EmbeddingError(
                f"{self.path}: an SDXL embedding ({', '.join(self.vectors)}) used with a single-encoder model"
            )
        vectors = self.vectors.get(key or "*")
        if vectors is None:
            raise EmbeddingError(f"{self.path}: no {key} vectors (an SD 1.x / 2.x embedding on SDXL?)")
        if vectors.shape[1] != width:
            raise EmbeddingError(
                f"{self.path}: vectors are {vectors.shape[1]} wide, the text encoder is {width} wide "
                f"(an embedding for another model family)"
            )
        return vectors


def read_embedding(path) -> Embedding:
    """An embedding file, its vectors checked (float, 1-D or 2-D, finite, all SDXL parts equally long)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise EmbeddingError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {error}") from None
    if all(key in tensors for key in SDXL_KEYS):
        vectors = {key: tensors[key] for key in SDXL_KEYS}
    elif "emb_params" in tensors:
        vectors = {"*": tensors["emb_params"]}
    elif any(key.startswith(_STRING_TO_PARAM) for key in tensors):
        params = [key for key in tensors if key.startswith(_STRING_TO_PARAM)]
        if len(params) != 1:
            raise EmbeddingError(f"{path}: {len(params)} string_to_param entries; A1111 embeddings hold one")
        vectors = {"*": tensors[params[0]]}
    elif len(tensors) == 1:
        vectors = {"*": next(iter(tensors.values()))}
    else:
        raise EmbeddingError(
            f"{path}: not a textual-inversion embedding: expected emb_params, string_to_param.*, clip_l + clip_g "
            f"or a single tensor, found {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])})"
        )
    checked = {}
    for key, tensor in vectors.items():
        if tensor.ndim == 1:
            tensor = tensor[None]
        if tensor.ndim != 2 or tensor.shape[0] < 1 or not tensor.is_floating_point():
            raise EmbeddingError(
                f"{path}: vectors must be a float [count, width] tensor, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise EmbeddingError(f"{path}: the vectors hold NaN or infinite values")
        checked[key] = tensor.float()
    if len({t.shape[0] for t in checked.values()}) > 1:
        raise EmbeddingError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    return Embedding(path.name[: -len(EMBEDDING_SUFFIX)], checked, path)


class EmbeddingLibrary:
    """The embeddings of one folder, listed at each use (files added later are seen) and read once."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"embeddings folder {self.folder} is not a folder")

    def names(self) -> list[str]:
        root = self.folder.resolve()
        return sorted(
            path.name[: -len(EMBEDDING_SUFFIX)]
            for path in self.folder.iterdir()
            if path.name.endswith(EMBEDDING_SUFFIX) and path.is_file() and path.resolve().parent == root
        )

    def get(self, name: str) -> Embedding:
        path = self.folder / f"{name}{EMBEDDING_SUFFIX}"
        stat = path.stat()
        return _read_cached(str(path), stat.st_size, stat.st_mtime_ns)

    def matcher(self, tokenizer) -> EmbeddingMatcher:
        """Finds this folder's names in a prompt's token ids (one per prompt encoding)."""
        names = self.names()
        ids = tokenizer.token_ids(names) if names else []
        return EmbeddingMatcher(self, dict(zip(names, map(tuple, ids))))


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> Embedding:
    return read_embedding(path)


class EmbeddingMatcher:
    """A1111's find_embedding_at_position: the longest name whose token ids start at a position."""

    def __init__(self, library: EmbeddingLibrary, ids_by_name: dict[str, tuple[int, ...]]):
        self.library = library
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name, ids in ids_by_name.items():
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda item: -len(item[0]))

    def __bool__(self) -> bool:
        return bool(self._by_first)

    def unbracket(self, text: str) -> str:
        """`<name>` -> `name` for the folder's names (other `<...>` text stays as written)."""
        names = {name for candidates in self._by_first.values() for _, name in candidates}
        return re.sub(r"<([^<>:]+)>", lambda m: m.group(1) if m.group(1) in names else m.group(0), text)

    def at(self, ids: list[int], position: int) -> tuple[Embedding, int] | None:
        """(embedding, how many prompt tokens its name takes) if a name starts at ids[position]."""
        for name_ids, name in self._by_first.get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return self.library.get(name), len(name_ids)
        return None


def library(folder) -> EmbeddingLibrary | None:
    """The library of `folder` (None: no embeddings)."""
    return None if folder is None else EmbeddingLibrary(folder)


def input_embeddings(text_encoder, ids: torch.Tensor, fixes, key: str | None = None) -> torch.Tensor:
    """The text encoder's input [B, N, C]: token embeddings with each fix (row, first slot, Embedding)'s
    vectors written over its slots, plus the position embeddings (CLIPTextEmbeddings.forward with the
    fixes). key: which of an SDXL embedding's parts ("clip_l" / "clip_g"); None for SD 1.x / 2.x."""
    embeddings = getattr(text_encoder, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "token_embedding"):
        raise EmbeddingError(
            f"textual-inversion embeddings need the torch text encoder's token embeddings; this one "
            f"({type(text_encoder).__name__}) runs from an exported graph"
        )
    tokens = embeddings.token_embedding(ids)
    for row, start, embedding in fixes:
        vectors = embedding.for_encoder(tokens.shape[-1], key)
        tokens[row, start : start + vectors.shape[0]] = vectors.to(tokens.device, tokens.dtype)
    return tokens + embeddings.position_embedding.weight[: ids.shape[1]]
