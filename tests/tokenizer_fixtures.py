"""CLIP vocabulary files for tests, derived from open_clip's bundled BPE by open_clip itself.

open_clip's SimpleTokenizer is an implementation independent of ours and of transformers; its
encoder and merge ranks are what OpenAI's vocab.json / merges.txt hold, except that it names the
special tokens <start_of_text> / <end_of_text> instead of <|startoftext|> / <|endoftext|>.
"""

import json
from pathlib import Path

_SPECIAL_TOKEN_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def open_clip_reference_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    vocab = {_SPECIAL_TOKEN_NAMES.get(token, token): i for token, i in reference.encoder.items()}
    merges = [pair for pair, _ in sorted(reference.bpe_ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def write_clip_vocab_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt as Hugging Face hub tokenizer folders hold them."""
    vocab, merges = open_clip_reference_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    vocab_json.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_json, merges_txt


def write_sd_tokenizer_folder(folder: Path, pad_token: str) -> Path:
    """A diffusers `tokenizer/` folder laid out as SD 1.x / 2.x ship it: tokenizer_config.json always
    says pad `<|endoftext|>`; special_tokens_map.json, which overrides it, holds the real pad token
    (`<|endoftext|>` for SD 1.x, `!` for SD 2.x) and writes the other tokens in dict form."""
    write_clip_vocab_files(folder)

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "unk_token": added("<|endoftext|>"),
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
