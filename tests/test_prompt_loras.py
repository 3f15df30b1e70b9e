"""`<lora:NAME:W>` in prompts (runtime/prompt_loras.py): parsed as A1111 does, resolved only inside the LoRA
folder, applied for one call and removed bit for bit, written into the PNG as A1111's `Lora hashes`."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import runtime
from runtime.bench.presets import write_random_model
from runtime.model_hash import lora_hash
from runtime.pipeline import Pipeline
from runtime.prompt_loras import PromptLora, PromptLoraError, find_tags, resolve, without_tags
from tests.lora_factory import write_kohya_unet_lora

RUN = dict(steps=2, seed=3, guidance=7.5, width=32, height=32, progress=False)
RANK = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_loras")
    model = write_random_model("tiny", root / "model")
    folder = root / "loras"
    folder.mkdir()
    pipe = runtime.load(model, backend="torch", device="cpu", dtype="fp32", lora_dir=folder)
    write_kohya_unet_lora(pipe.unet, folder / "ink.safetensors", seed=1)
    write_kohya_unet_lora(pipe.unet, folder / "wash.safetensors", seed=2)
    return pipe, folder


def weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a fox <lora:ink>", [PromptLora("ink", 1.0, "<lora:ink>")]),
        ("<lora:ink:0.8> a fox", [PromptLora("ink", 0.8, "<lora:ink:0.8>")]),
        ("<lora:ink:-0.5:-0.5>", [PromptLora("ink", -0.5, "<lora:ink:-0.5:-0.5>")]),  # A1111's te:unet pair
        ("<lora:ink:te=0.3>", [PromptLora("ink", 0.3, "<lora:ink:te=0.3>")]),
        ("<lora:ink:0.2>, <lora:ink:0.4>", [PromptLora("ink", 0.4, "<lora:ink:0.4>")]),  # the last one wins
        ("<lora:a:1> <lora:b:2>", [PromptLora("a", 1.0, "<lora:a:1>"), PromptLora("b", 2.0, "<lora:b:2>")]),
        ("<hypernet:x:1> (no lora)", []),
    ],
)
def test_tags_parse_as_a1111(prompt, expected):
    assert find_tags(prompt) == expected


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<lora:ink:strong>", "is not a finite number"),
        ("<lora:ink:nan>", "is not a finite number"),
        ("<lora::0.5>", "the LoRA name is empty"),
        ("<lora:ink:0.5:0.8>", "separate text-encoder and UNet weights"),
        ("<lora:ink:1:1:1>", "too many fields"),
    ],
)
def test_bad_tags_are_named(prompt, message):
    with pytest.raises(PromptLoraError, match=message):
        find_tags(prompt)


def test_tags_are_removed_before_encoding(setup):
    pipe, _ = setup
    assert without_tags(["a fox <lora:ink:0.8>, red"]) == ["a fox , red"]
    tagged = pipe.encode_prompt(["a fox <lora:ink:0.8>, red"], None, 7.5)
    assert torch.equal(tagged, pipe.encode_prompt(["a fox , red"], None, 7.5))


def test_names_stay_inside_the_folder(setup, tmp_path):
    _, folder = setup
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not for you")
    for name in ("../secret", "..", "sub/ink", "sub\\ink", str(outside.with_suffix(""))):
        with pytest.raises(PromptLoraError, match="not by a path"):
            resolve(name, folder)
    link = folder / "escape.safetensors"
    os.symlink(outside, link)
    try:
        with pytest.raises(PromptLoraError, match="no LoRA named 'escape'"):
            resolve("escape", folder)
    finally:
        link.unlink()
    with pytest.raises(PromptLoraError, match=r"no LoRA named 'nope' in .* \(it holds: ink, wash\)"):
        resolve("nope", folder)
    with pytest.raises(PromptLoraError, match="no LoRA folder is set"):
        resolve("ink", None)


def test_a_prompt_lora_applies_for_the_call_and_is_removed_bit_for_bit(setup):
    pipe, folder = setup
    base_weights = weights(pipe)
    base = np.asarray(pipe.generate("a fox", **RUN)[0])
    tagged = pipe.generate("a fox <lora:ink:0.8>", **RUN)[0]
    assert pipe.loras == {}
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, base_weights[key]), key
    pipe.load_lora(folder / "ink.safetensors", scale=0.8)
    try:
        loaded = np.asarray(pipe.generate("a fox", **RUN)[0])
    finally:
        pipe.unload_lora()
    assert np.array_equal(np.asarray(tagged), loaded)  # the tag is exactly load_lora at that weight
    assert not np.array_equal(loaded, base)
    assert np.array_equal(np.asarray(pipe.generate("a fox", **RUN)[0]), base)


def test_the_png_keeps_the_tag_and_lists_lora_hashes(setup):
    pipe, folder = setup
    image = pipe.generate("a fox <lora:ink:0.8> <lora:wash>", **RUN)[0]
    parameters = image.info["parameters"]
    assert parameters.startswith("a fox <lora:ink:0.8> <lora:wash>\n")
    hashes = f"ink: {lora_hash(folder / 'ink.safetensors')}, wash: {lora_hash(folder / 'wash.safetensors')}"
    assert parameters.endswith(f', Lora hashes: "{hashes}"')
    assert image.info["lora_hashes"] == hashes
    assert image.info["loras"] == "ink: 0.8, wash: 1"
    assert "Lora hashes" not in pipe.generate("a fox", **RUN)[0].info["parameters"]


def test_lora_hash_is_a1111s_addnet_hash(setup, tmp_path):
    pipe, folder = setup
    data = (folder / "ink.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    assert lora_hash(folder / "ink.safetensors") == expected
    # Metadata changes the header, not the hash; a stored sshs_model_hash is used as it is.
    retagged = write_kohya_unet_lora(
        pipe.unet, tmp_path / "retagged.safetensors", seed=1, metadata={"ss_output_name": "x"}
    )
    assert json.loads(retagged.read_bytes()[8 : 8 + int.from_bytes(retagged.read_bytes()[:8], "little")])
    assert lora_hash(retagged) == expected
    stored = write_kohya_unet_lora(
        pipe.unet, tmp_path / "stored.safetensors", seed=1, metadata={"sshs_model_hash": "ab" * 32}
    )
    assert lora_hash(stored) == "ab" * 6


def test_a_loaded_lora_named_in_the_prompt_is_rescaled_for_the_call(setup):
    pipe, folder = setup
    pipe.load_lora(folder / "ink.safetensors", scale=0.3)
    try:
        at_03 = weights(pipe)
        tagged = np.asarray(pipe.generate("a fox <lora:ink:0.9>", **RUN)[0])
        assert pipe.loras == {"ink": 0.3}
        for key, value in pipe.unet.state_dict().items():
            assert torch.equal(value, at_03[key]), key
        pipe.set_lora_scale("ink", 0.9)
        assert np.array_equal(tagged, np.asarray(pipe.generate("a fox", **RUN)[0]))
    finally:
        pipe.unload_lora()


def test_unknown_names_and_mixed_batches_fail_before_any_step(setup):
    pipe, _ = setup
    base_weights = weights(pipe)
    steps = []
    with pytest.raises(PromptLoraError, match=r"no LoRA named 'nope' .*\(it holds: ink, wash\)"):
        pipe.generate("a fox <lora:ink> <lora:nope>", callback=lambda *a: steps.append(a), **RUN)
    with pytest.raises(PromptLoraError, match="every prompt of one call must name the same"):
        pipe.generate(["a <lora:ink>", "b <lora:wash>"], callback=lambda *a: steps.append(a), **RUN)
    assert steps == [] and pipe.loras == {}
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, base_weights[key]), key


def test_a_tag_without_a_lora_folder_says_how_to_set_one(setup):
    pipe, _ = setup
    other = Pipeline(pipe.components, backend="torch")
    assert other.lora_dir is None
    with pytest.raises(PromptLoraError, match="no LoRA folder is set: pass lora_dir="):
        other.generate("a fox <lora:ink>", **RUN)
    with pytest.raises(NotADirectoryError, match="lora_dir .* is not a folder"):
        runtime.load("/nope-model", lora_dir="/nope-loras")


def test_diffusers_style_call_with_clip_skip_applies_the_tag_to_the_text_encoder_too(setup, tmp_path):
    pipe, folder = setup
    tensors = {}
    generator = torch.Generator().manual_seed(5)
    for key, weight in pipe.text_encoder.state_dict().items():
        if key.endswith("self_attn.q_proj.weight"):
            path = key[: -len(".weight")]
            tensors[f"text_encoder.{path}.lora_A.weight"] = torch.randn(RANK, weight.shape[1], generator=generator)
            tensors[f"text_encoder.{path}.lora_B.weight"] = torch.randn(weight.shape[0], RANK, generator=generator)
    save_file(tensors, str(folder / "words.safetensors"))
    try:
        kwargs = dict(num_inference_steps=2, width=32, height=32, clip_skip=1, output_type="latent", progress=False)
        tagged = pipe("a fox <lora:words>", generator=torch.Generator().manual_seed(1), **kwargs).images
        pipe.load_lora(folder / "words.safetensors")
        try:
            loaded = pipe("a fox", generator=torch.Generator().manual_seed(1), **kwargs).images
        finally:
            pipe.unload_lora()
        plain = pipe("a fox", generator=torch.Generator().manual_seed(1), **kwargs).images
        assert torch.equal(tagged, loaded) and not torch.equal(tagged, plain)
    finally:
        (folder / "words.safetensors").unlink()
