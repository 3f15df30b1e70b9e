"""runtime/presets.py: random-weight models written as diffusers folders, loadable by us and diffusers."""
import re

import pytest
import torch
from transformers import CLIPTokenizer as ReferenceTokenizer

import runtime.tokenizer
from runtime.presets import PRESETS, preset_configs, write_random_model
from runtime.weights import load_components

PROMPT = "A red fox, 3 cubs & snow!"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


def test_written_model_loads_with_the_preset_architecture_and_moved_weights(tiny_folder):
    components = load_components(tiny_folder)
    configs = preset_configs("tiny")
    assert components.unet.config.block_out_channels == tuple(configs["unet"]["block_out_channels"])
    norm = components.unet.conv_norm_out
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))  # perturbed off default init


def test_written_tokenizer_is_the_real_clip_vocabulary(tiny_folder):
    ours = load_components(tiny_folder).tokenizer([PROMPT])
    theirs = ReferenceTokenizer.from_pretrained(str(tiny_folder / "tokenizer"))
    expected = theirs([PROMPT], padding="max_length", max_length=77).input_ids
    assert ours.tolist() == expected
    assert ours[0, 0].item() == 49406  # the real vocabulary's BOS


def test_without_open_clip_a_byte_level_vocabulary_is_written(tmp_path, monkeypatch):
    def missing():
        raise FileNotFoundError("open_clip is not installed")

    monkeypatch.setattr(runtime.tokenizer, "_open_clip_bpe_path", missing)
    folder = write_random_model("tiny", tmp_path / "model")
    ours = load_components(folder).tokenizer([PROMPT])
    theirs = ReferenceTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert ours.tolist() == theirs([PROMPT], padding="max_length", max_length=77).input_ids
    # Each non-space character is its own token (its "</w>" form at a word's end), between BOS and EOS.
    characters = len(PROMPT.replace(" ", "").lower())
    assert ours[0, 0].item() == 512
    assert (ours[0, 1:characters + 1] < 512).all() and ours[0, characters + 1].item() == 513


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=re.escape(f"unknown preset 'sd99'; choose one of {PRESETS}")):
        preset_configs("sd99")
