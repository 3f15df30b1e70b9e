"""SDXL on exported graphs: both text encoders (penultimate + pooled), the UNet with text_embeds / time_ids
and the VAE, checked on onnxruntime CPU against torch at a shape other than the traced one, and the
onnxruntime pipeline's images against the torch backend's."""

import pytest
import torch

import runtime
from export.manifest import Manifest
from export.onnx import model_networks, network_module, specs_of
from export.specs import NETWORKS_OF, ShapeProfile
from runtime.backends.onnxruntime_backend import OrtNetwork
from runtime.images import psnr
from runtime.weights import load_components
from tests.export.conftest import CHECK_SHAPE, SMALL_PROFILE

MIN_PSNR_DB = 30.0


def test_the_base_exports_five_graphs_with_sdxl_interfaces(sdxl_folder, sdxl_export):
    assert model_networks(sdxl_folder) == NETWORKS_OF["sdxl"]
    artifacts = set(Manifest.open(sdxl_export).artifacts)
    assert artifacts == {f"{name}.onnx" for name in NETWORKS_OF["sdxl"]}
    specs = specs_of(load_components(sdxl_folder))
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert specs["unet"].inputs[3].dims == ("B", 128) and specs["unet"].inputs[4].dims == ("B", 6)
    assert specs["text_encoder"].output_names == ["penultimate_hidden_state", "pooler_output"]
    assert specs["text_encoder_2"].output_names == ["penultimate_hidden_state", "text_embeds"]
    # TensorRT profiles cover the added inputs too (min one image, opt / max the guided batch).
    shapes = specs["unet"].profile_shapes(ShapeProfile())
    assert shapes["time_ids"] == ((1, 6), (2, 6), (8, 6)) and shapes["text_embeds"][2] == (8, 128)


def test_graphs_match_torch_at_another_shape(sdxl_folder, sdxl_export):
    """Traced at 1x72x72 (SMALL_PROFILE's opt, grown to an odd latent), run at 2x48x80."""
    components = load_components(sdxl_folder)
    specs = specs_of(components)
    for name in NETWORKS_OF["sdxl"]:
        spec = specs[name]
        network = OrtNetwork(sdxl_export / f"{name}.onnx", spec, "cpu", torch.float32, torch.float32)
        inputs = dict(zip(spec.input_names, spec.sample_inputs(CHECK_SHAPE, seed=3)))
        with torch.no_grad():
            expected = network_module(components, name)(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = network(**inputs)
        for tensor_spec, want in zip(spec.outputs, expected):
            have = got[tensor_spec.name]
            assert have.shape == want.shape, (name, tensor_spec.name)
            error = (have - want).abs().max() / want.abs().max()
            assert error <= 1e-4, f"{name}.{tensor_spec.name}: relative error {error:.2e}"


def test_images_match_the_torch_backend(sdxl_folder, sdxl_export):
    reference = runtime.load(sdxl_folder, backend="torch")
    deployed = runtime.load(sdxl_folder, backend="onnxruntime", engine_dir=sdxl_export)
    assert set(Manifest.open(sdxl_export).artifacts) == {f"{n}.onnx" for n in NETWORKS_OF["sdxl"]}  # reused
    options = dict(steps=3, guidance=6.0, width=80, height=48, seed=11, num_images=2, progress=False)
    for negative in ("blurry", None):  # None: force_zeros_for_empty_prompt
        expected = reference.generate("a lighthouse at dusk", negative_prompt=negative, **options)
        got = deployed.generate("a lighthouse at dusk", negative_prompt=negative, **options)
        for e, g in zip(expected, got):
            assert psnr(e, g) >= MIN_PSNR_DB
    expected = reference.img2img(got[0], "a lighthouse at dawn", strength=0.6, **options)
    got = deployed.img2img(got[0], "a lighthouse at dawn", strength=0.6, **options)
    assert psnr(expected[1], got[1]) >= MIN_PSNR_DB


def test_tensorrt_engines_for_every_sdxl_network(sdxl_folder, sdxl_export, tmp_path, monkeypatch):
    """ensure_engines with TensorRT faked (as tests/export/test_tensorrt.py): one plan per SDXL network,
    profiles with the added inputs; the real build needs TensorRT and a GPU."""
    import importlib.machinery
    import json
    import shutil
    import sys

    import export.tensorrt as trt_export
    from tests.export.test_tensorrt import H100, _FakeTensorRT

    out = shutil.copytree(sdxl_export, tmp_path / "engines")
    fake = _FakeTensorRT("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "current_gpu", lambda: dict(H100))
    built = []

    def fake_build(onnx_path, plan_path, spec, profile, options, timing_cache_path, meta):
        built.append((plan_path.name, options.refittable))
        plan_path.write_bytes(b"not an engine")
        trt_export.metadata_path(plan_path).write_text(json.dumps(meta))

    monkeypatch.setattr(trt_export, "build_engine", fake_build)
    options = trt_export.EngineOptions(refittable=True)
    plans = trt_export.ensure_engines(out, sdxl_folder, profile=SMALL_PROFILE, options=options, progress=False)
    assert [name for name, _ in built] == [f"{n}.plan" for n in NETWORKS_OF["sdxl"]] and all(r for _, r in built)
    meta = trt_export.read_metadata(plans["unet"])
    assert meta["profile"]["time_ids"] == [[1, 6], [2, 6], [8, 6]] and meta["refittable"] is True
    assert meta["profile"]["encoder_hidden_states"][2] == [8, 231, 192]  # 64 + 128: both encoders; 3 chunks
    assert trt_export.read_metadata(plans["text_encoder_2"])["spec"]["outputs"][1][0] == "text_embeds"


def test_the_networks_of_a_model_are_read_without_loading_it(tmp_path):
    from tests.sdxl_factory import save_sdxl_single_file

    base = save_sdxl_single_file(tmp_path / "base.safetensors", "sdxl")
    refiner = save_sdxl_single_file(tmp_path / "refiner.safetensors", "sdxl-refiner", seed=1)
    assert model_networks(base) == NETWORKS_OF["sdxl"]
    assert model_networks(refiner) == ("text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors does not exist"):
        model_networks(tmp_path / "nowhere.safetensors")
