"""CLIP BPE tokenizer on the `tokenizers` library: prompts -> LongTensor [B, 77].

Produces the same ids as transformers' `CLIPTokenizer` (what diffusers pipelines call) with
`padding="max_length", max_length=77, truncation=True`: NFC, whitespace runs -> one space, lowercase,
CLIP's pre-tokenizer regex, byte-level BPE with a `</w>` end-of-word suffix, BOS 49406 first and EOS
49407 last (kept last when a prompt is truncated), then the pad token. SD 1.x pads with
`<|endoftext|>` (49407), SD 2.x with `!` (0): the folder's special_tokens_map.json says which.

One deliberate difference from transformers: the pad token only pads. transformers also makes it a
special token that splits prompts, so with SD 2.x's `!` a prompt's "!!!" becomes three pad ids
instead of the BPE token "!!!" that OpenCLIP (which SD 2.x was trained with) produces
(diffusers issue #4153). Here "!!!" stays one token, as in OpenCLIP, A1111 and ComfyUI.

Sources of a vocabulary: a diffusers `tokenizer/` folder (tokenizer.json, or vocab.json + merges.txt),
explicit vocab/merges files, or open_clip's bundled BPE file (single-file checkpoints ship no tokenizer
and there is no network at runtime).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD1_PAD_TOKEN = EOS_TOKEN
SD2_PAD_TOKEN = "!"
MAX_LENGTH = 77

# OpenAI CLIP's word splitter: special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
    r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)

# transformers writes this for "no limit" in tokenizer_config.json's model_max_length.
_UNSET_MODEL_MAX_LENGTH = 10**6

# open_clip's BPE file: line 0 is a header; the CLIP vocabulary uses the next 49152-256-2 merges.
_OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_OPEN_CLIP_MERGE_COUNT = 49152 - 256 - 2

_FOLDER_FILES_HELP = (
    "tokenizer.json, or vocab.json + merges.txt (optionally with tokenizer_config.json / special_tokens_map.json)"
)


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than fit in max_length; the text past the cut is ignored."""


@dataclass(frozen=True)
class Truncation:
    index: int  # which prompt of the batch
    dropped_text: str  # the prompt's text from the first token that did not fit


@dataclass(frozen=True)
class TokenizedPrompts:
    input_ids: torch.Tensor  # LongTensor [B, max_length]
    truncated: tuple[Truncation, ...]  # one entry per prompt that was cut, in batch order


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_alphabet() -> list[str]:
    """CLIP's first 512 tokens: the 256 byte characters, then each with the end-of-word mark `</w>`."""
    byte_chars = list(_bytes_to_unicode().values())
    return byte_chars + [c + "</w>" for c in byte_chars]


def _token_name(value, source: str, key: str) -> str:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: str or {content}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: {key!r} must be a token string or {{'content': ...}}, got {value!r}")
    return value


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_vocab_json(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ValueError(f"{path} must be a JSON object mapping token strings to integer ids")
    return vocab


def _parse_merge(line, where: str) -> tuple[str, str]:
    # tokenizers >= 0.20 writes merges as [a, b] pairs; older files and merges.txt as "a b".
    parts = line.split(" ") if isinstance(line, str) else line
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"{where}: a merge must be two symbols, got {line!r}")
    return parts[0], parts[1]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line or (number == 1 and line.startswith("#version")):
                continue
            merges.append(_parse_merge(line, f"{path} line {number}"))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges of a tokenizers/transformers tokenizer.json. Its pipeline is not
    used: the CLIP pipeline is rebuilt around them, so every source tokenizes the same way."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        found = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{path}: 'model.type' must be 'BPE' for a CLIP tokenizer, got {found!r}")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ValueError(f"{path}: 'model.vocab' must map token strings to integer ids")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: 'model.merges' must be a list, got {type(merges).__name__}")
    merges = [_parse_merge(m, f"{path} model.merges[{i}]") for i, m in enumerate(merges)]
    # Special tokens may live only in added_tokens; they still need their ids.
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            vocab.setdefault(added["content"], added["id"])
    return vocab, merges


def _folder_settings(folder: Path) -> tuple[str, int]:
    """(pad token, max length) of a tokenizer folder, resolved as transformers does: a legacy
    tokenizer_config.json (no `added_tokens_decoder`, as SD 1.x/2.x ship it) is overridden by
    special_tokens_map.json. This matters for SD 2.x, whose config says `<|endoftext|>` but whose
    special_tokens_map.json, the one that applies, says `!`."""
    config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config = _read_json_object(config_path) if config_path.is_file() else {}
    special = _read_json_object(map_path) if map_path.is_file() else {}
    sources = [(config_path, config), (map_path, special)]
    if "added_tokens_decoder" not in config:
        sources.reverse()
    pad_token = SD1_PAD_TOKEN
    for path, settings in sources:
        if settings.get("pad_token") is not None:
            pad_token = _token_name(settings["pad_token"], str(path), "pad_token")
            break
    max_length = MAX_LENGTH
    value = config.get("model_max_length")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 3:
            raise ValueError(f"{config_path}: 'model_max_length' must be an int >= 3, got {value!r}")
        if value < _UNSET_MODEL_MAX_LENGTH:
            max_length = int(value)
    return pad_token, max_length


def _read_json_object(path: Path) -> dict:
    settings = _read_json(path)
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must be a JSON object, got {type(settings).__name__}")
    return settings


def _open_clip_bpe_path() -> Path:
    # find_spec locates the package without importing it (open_clip's import pulls in a lot).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"open_clip is not installed, so its {_OPEN_CLIP_BPE_FILE} is not available; "
            f"pass a tokenizer folder instead ({_FOLDER_FILES_HELP})"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _OPEN_CLIP_BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"open_clip is installed but {_OPEN_CLIP_BPE_FILE} was not found in {list(spec.submodule_search_locations)}"
    )


def open_clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (49408 tokens) and merges, derived from open_clip's BPE file exactly as
    OpenAI CLIP / open_clip / transformers' vocab.json do it: the 256 byte characters, the same with
    `</w>`, one token per merge in rank order, then BOS and EOS."""
    path = _open_clip_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [
        _parse_merge(line, f"{path} line {i + 1}") for i, line in enumerate(lines[1 : _OPEN_CLIP_MERGE_COUNT + 1])
    ]
    tokens = byte_level_alphabet() + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


class CLIPTokenizer:
    """prompts -> LongTensor [B, max_length]: BOS, tokens, EOS, pad. Calling it warns
    (PromptTruncatedWarning) for every prompt that was cut; `tokenize_with_info` returns that instead."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = SD1_PAD_TOKEN,
        max_length: int = MAX_LENGTH,
        source: str = "vocabulary",
    ):
        for role, token in (("BOS", BOS_TOKEN), ("EOS", EOS_TOKEN), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"{source}: the {role} token {token!r} is not in the vocabulary")
        if max_length < 3:
            raise ValueError(f"{source}: max_length must be >= 3 (BOS, a token, EOS), got {max_length}")
        self.max_length = max_length
        self.pad_token = pad_token
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token_id = vocab[pad_token]
        self.vocab_size = len(vocab)
        self.comma_token_id = vocab.get(",</w>")  # A1111 moves text after a comma to the next chunk
        try:
            model = BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=EOS_TOKEN,
            )
        except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
            raise ValueError(f"{source}: vocabulary and merges do not fit together: {e}") from None
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.post_processor = processors.RobertaProcessing(
            (EOS_TOKEN, self.eos_token_id), (BOS_TOKEN, self.bos_token_id), trim_offsets=False, add_prefix_space=False
        )
        # As in transformers: the literal BOS/EOS strings in a prompt become those tokens. The pad
        # token is not added here, so SD 2.x's "!" stays ordinary text (see the module docstring).
        tokenizer.add_special_tokens(
            [
                AddedToken(BOS_TOKEN, special=True, normalized=False),
                AddedToken(EOS_TOKEN, special=True, normalized=False),
            ]
        )
        # Truncation counts BOS and EOS, so EOS stays last.
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=pad_token)
        self._tokenizer = tokenizer
        # The same pipeline without truncation or padding, for prompts split into chunks.
        self._uncut = Tokenizer.from_str(tokenizer.to_str())
        self._uncut.no_truncation()
        self._uncut.no_padding()

    @classmethod
    def from_vocab_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        pad_token: str = SD1_PAD_TOKEN,
        max_length: int = MAX_LENGTH,
    ) -> CLIPTokenizer:
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        for path in (vocab_json, merges_txt):
            if not path.is_file():
                raise FileNotFoundError(f"CLIP tokenizer file not found: {path}")
        return cls(
            _read_vocab_json(vocab_json),
            _read_merges_txt(merges_txt),
            pad_token=pad_token,
            max_length=max_length,
            source=f"{vocab_json} + {merges_txt.name}",
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """A diffusers `tokenizer/` folder: tokenizer.json, or vocab.json + merges.txt. The pad token
        and max length come from tokenizer_config.json / special_tokens_map.json when present."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CLIP tokenizer folder not found: {folder} (expected a folder with {_FOLDER_FILES_HELP})"
            )
        pad_token, max_length = _folder_settings(folder)
        if (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
            return cls(vocab, merges, pad_token=pad_token, max_length=max_length, source=str(folder / "tokenizer.json"))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_vocab_files(
                folder / "vocab.json", folder / "merges.txt", pad_token=pad_token, max_length=max_length
            )
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"CLIP tokenizer folder {folder} lacks the vocabulary: expected "
            f"{_FOLDER_FILES_HELP}; found {present or 'nothing'}"
        )

    @classmethod
    def from_open_clip_bpe(cls, pad_token: str = SD1_PAD_TOKEN, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
        """The CLIP vocabulary from open_clip's bundled BPE file, for checkpoints that ship no tokenizer.
        pad_token: SD1_PAD_TOKEN for SD 1.x, SD2_PAD_TOKEN for SD 2.x."""
        vocab, merges = open_clip_vocab_and_merges()
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length, source=f"open_clip {_OPEN_CLIP_BPE_FILE}")

    def tokenize_with_info(self, prompts: str | list[str]) -> TokenizedPrompts:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}: {prompt!r}")
        encodings = [self._tokenizer.encode(p) for p in prompts]
        truncated = []
        for i, (prompt, encoding) in enumerate(zip(prompts, encodings)):
            if encoding.overflowing:
                # offsets index the original prompt; the token before EOS is the last one kept.
                kept_end = encoding.offsets[-2][1]
                truncated.append(Truncation(i, prompt[kept_end:].strip()))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        return TokenizedPrompts(ids, tuple(truncated))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids without BOS/EOS, uncut and unpadded (runtime/prompt_syntax.py chunks them)."""
        return [encoding.ids for encoding in self._uncut.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        result = self.tokenize_with_info(prompts)
        for cut in result.truncated:
            warnings.warn(
                f"prompt {cut.index} is longer than {self.max_length} CLIP tokens; this part is "
                f"ignored: {cut.dropped_text!r}",
                PromptTruncatedWarning,
                stacklevel=2,
            )
        return result.input_ids
