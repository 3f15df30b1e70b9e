"""SDXL base and refiner weights: diffusers folders (variants, shards, refiner without encoder 1) and
single files (SGM layout), the family read from the tensors, and clear errors for partial files."""

import json
import shutil

import pytest
import torch

from runtime.single_file import SDXL_CLIP_L_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, detect_layout
from runtime.weights import WeightLoadError, load_components
from tests.sdxl_factory import (
    NETWORKS,
    SDXL_KINDS,
    build_sdxl_reference_models,
    save_sdxl_folder,
    save_sdxl_single_file,
    sdxl_single_file_state_dict,
    small_sdxl_configs,
)


@pytest.fixture(scope="module", params=SDXL_KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def folder(kind, tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp(kind) / "model", kind, seed=0)


@pytest.fixture(scope="module")
def single(kind, tmp_path_factory):
    return save_sdxl_single_file(tmp_path_factory.mktemp(kind) / "model.safetensors", kind, seed=0)


def _states(components) -> dict:
    return {
        name: getattr(components, name).state_dict()
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(components, name) is not None
    }


def _assert_identical(ours: dict, reference: dict, what: str):
    assert set(ours) == set(reference), f"{what}: keys differ: {sorted(set(ours) ^ set(reference))[:5]}"
    different = [k for k in reference if not torch.equal(ours[k], reference[k])]
    assert not different, f"{what}: tensors differ for {different[:5]}"


def test_folder_loads_the_reference_tensors(kind, folder):
    components = load_components(folder)
    assert components.kind == kind
    reference = build_sdxl_reference_models(kind)
    states = _states(components)
    assert set(states) == set(NETWORKS[kind])
    for name, state in states.items():
        _assert_identical(state, reference[name].state_dict(), name)
    flags = components.pipeline_config
    assert flags["requires_aesthetics_score"] == (kind == "sdxl-refiner")
    assert flags["force_zeros_for_empty_prompt"] == (kind == "sdxl")
    assert components.tokenizer_2.pad_token == "!"
    assert (components.tokenizer is None) == (kind == "sdxl-refiner")


def test_single_file_round_trip_gives_identical_tensors(kind, folder, single):
    from_folder, from_file = load_components(folder), load_components(single)
    assert from_file.kind == kind
    assert from_file.pipeline_config == from_folder.pipeline_config
    assert from_file.vae.config.scaling_factor == 0.13025 and from_file.vae.config.force_upcast
    folder_states, file_states = _states(from_folder), _states(from_file)
    assert set(folder_states) == set(file_states)
    for name in folder_states:
        _assert_identical(file_states[name], folder_states[name], name)
    assert from_file.tokenizer_2.pad_token == "!"


def test_family_is_read_from_the_tensors(kind):
    shapes = {k: tuple(v.shape) for k, v in sdxl_single_file_state_dict(kind).items()}
    layout = detect_layout(shapes, "x.safetensors")
    assert layout.kind == kind
    assert (layout.text_prefix is None) == (kind == "sdxl-refiner")


def test_writer_is_undone_by_diffusers_converters(kind):
    """An independent check of the single-file layout our loader reads: diffusers' own SGM converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    reference = build_sdxl_reference_models(kind)
    original = sdxl_single_file_state_dict(kind)
    _assert_identical(
        convert_ldm_unet_checkpoint(original, small_sdxl_configs(kind)["unet"]), reference["unet"].state_dict(), "unet"
    )
    prefix = SDXL_OPEN_CLIP_PREFIX if kind == "sdxl" else "conditioner.embedders.0.model."
    text = convert_open_clip_checkpoint(reference["text_encoder_2"], original, prefix=prefix)
    _assert_identical(text, reference["text_encoder_2"].state_dict(), "text_encoder_2")


def test_fp16_variant_and_shards(tmp_path):
    path = save_sdxl_folder(tmp_path / "model", "sdxl", shards=True, seed=0)
    save_sdxl_folder(path, "sdxl", dtype=torch.float16, variant="fp16", seed=0)
    assert list((path / "unet").glob("*.safetensors.index.json")), "the UNet is not sharded"
    components = load_components(path, variant="fp16", dtype="fp16")
    reference = build_sdxl_reference_models("sdxl")
    for name, state in _states(components).items():
        _assert_identical(state, {k: v.half() for k, v in reference[name].state_dict().items()}, name)


@pytest.mark.parametrize(
    "drop, message",
    [
        (SDXL_OPEN_CLIP_PREFIX, "partial SDXL checkpoint"),
        (SDXL_CLIP_L_PREFIX, "partial SDXL checkpoint"),
        (UNET_PREFIX, "without a UNet"),
        ("first_stage_model.", "no VAE"),
        (SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.1.ln_1.weight", "missing key"),
    ],
)
def test_partial_single_file_is_refused_naming_the_file(tmp_path, drop, message):
    path = save_sdxl_single_file(tmp_path / "partial.safetensors", "sdxl", drop_prefix=drop)
    with pytest.raises(WeightLoadError, match=message) as error:
        load_components(path)
    assert "partial.safetensors" in str(error.value)


def test_refiner_folder_must_say_it_needs_an_aesthetic_score(tmp_path):
    path = save_sdxl_folder(tmp_path / "model", "sdxl-refiner")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    with pytest.raises(WeightLoadError, match="requires_aesthetics_score"):
        load_components(path)


def test_base_folder_without_text_encoder_2_folder(tmp_path):
    path = save_sdxl_folder(tmp_path / "model", "sdxl")
    shutil.rmtree(path / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_components(path)


def test_mismatched_context_width_names_both_configs(tmp_path):
    path = save_sdxl_folder(tmp_path / "model", "sdxl")
    config = json.loads((path / "text_encoder" / "config.json").read_text())
    (path / "text_encoder" / "config.json").write_text(
        json.dumps({**config, "hidden_size": 128, "intermediate_size": 128})
    )
    with pytest.raises(WeightLoadError, match="cross_attention_dim=192"):
        load_components(path)
