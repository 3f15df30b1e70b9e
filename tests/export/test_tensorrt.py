"""TensorRT: everything that does not need the library (profiles, metadata, compatibility and shape
checks, rebuild decisions) runs everywhere; building and running engines needs TensorRT and a GPU."""
import json
from types import SimpleNamespace

import pytest

from export.manifest import Manifest
from export.specs import ImageShape, ShapeProfile, network_specs
from export.tensorrt import (EngineMismatchError, EngineOptions, TensorRTUnavailable, check_engine_compatible,
                             check_shapes_in_profile, engine_key_fields, engine_metadata, import_tensorrt,
                             metadata_path, profile_json, read_metadata)
from export.manifest import ArtifactError

SPECS = network_specs(SimpleNamespace(in_channels=4, out_channels=4, cross_attention_dim=768),
                      SimpleNamespace(block_out_channels=(1, 2, 3, 4), latent_channels=4, in_channels=3,
                                      out_channels=3),
                      SimpleNamespace(max_position_embeddings=77, hidden_size=768, vocab_size=49408))
H100 = {"compute_capability": "9.0", "name": "NVIDIA H100 80GB HBM3"}


def _meta(**overrides):
    meta = engine_metadata(SPECS["unet"], ShapeProfile(), EngineOptions(), tensorrt_version="10.3.0",
                           gpu=H100, onnx_sha256="a" * 64)
    meta.update(overrides)
    return meta


def test_profile_in_metadata_comes_from_the_spec():
    meta = _meta()
    assert meta["profile"]["sample"] == [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 128]]
    assert meta["precision"] == "fp16" and meta["refittable"] is False
    assert json.loads(json.dumps(meta)) == meta
    assert profile_json(SPECS["vae_decoder"], ShapeProfile())["latent"][2] == [4, 4, 128, 128]


def test_engine_from_another_tensorrt_or_gpu_or_graph_is_refused():
    meta = _meta()
    check_engine_compatible(meta, "unet.plan", tensorrt_version="10.3.0", compute_capability="9.0",
                            onnx_sha256="a" * 64)
    with pytest.raises(EngineMismatchError, match="unet.plan was built by TensorRT 10.3.0 but TensorRT 10.8.0"):
        check_engine_compatible(meta, "unet.plan", tensorrt_version="10.8.0", compute_capability="9.0")
    with pytest.raises(EngineMismatchError, match=r"compute capability 9.0 \(NVIDIA H100.*this GPU is 8.9"):
        check_engine_compatible(meta, "unet.plan", tensorrt_version="10.3.0", compute_capability="8.9")
    with pytest.raises(EngineMismatchError, match="another model or export"):
        check_engine_compatible(meta, "unet.plan", tensorrt_version="10.3.0", compute_capability="9.0",
                                onnx_sha256="b" * 64)


def test_shapes_outside_the_profile_are_refused():
    meta = _meta()
    inside = {"sample": (2, 4, 64, 96), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    check_shapes_in_profile(meta, inside, "unet.plan")
    with pytest.raises(EngineMismatchError, match=r"'sample' shape \[2, 4, 160, 64\] is outside .*"
                                                  r"max \[8, 4, 128, 128\]"):
        check_shapes_in_profile(meta, {**inside, "sample": (2, 4, 160, 64)}, "unet.plan")
    with pytest.raises(EngineMismatchError, match="outside"):
        check_shapes_in_profile(meta, {**inside, "timestep": (10,)}, "unet.plan")
    with pytest.raises(EngineMismatchError, match="has no input 'latent'"):
        check_shapes_in_profile(meta, {"latent": (1, 4, 8, 8)}, "unet.plan")


def test_metadata_file_problems_are_named(tmp_path):
    plan = tmp_path / "unet.plan"
    with pytest.raises(ArtifactError, match="unet.plan does not exist"):
        read_metadata(plan)
    plan.write_bytes(b"engine")
    with pytest.raises(ArtifactError, match="unet.plan.json is missing"):
        read_metadata(plan)
    metadata_path(plan).write_text(json.dumps({"tensorrt_version": "10.3.0"}))
    with pytest.raises(ArtifactError, match="lacks .*compute_capability"):
        read_metadata(plan)
    metadata_path(plan).write_text(json.dumps(_meta()))
    assert read_metadata(plan)["compute_capability"] == "9.0"


def test_engine_rebuild_decisions(tmp_path):
    profile = ShapeProfile()
    fields = engine_key_fields("unet", "a" * 64, profile, EngineOptions(), "10.3.0", H100)
    manifest = Manifest.open(tmp_path)
    for name in ("unet.plan", "unet.plan.json"):
        (tmp_path / name).write_bytes(b"x" * 10)
    manifest.record("unet.plan", ["unet.plan", "unet.plan.json"], fields, extra_files=["timing_cache.bin"])
    (tmp_path / "timing_cache.bin").write_bytes(b"cache")  # ours: the directory is still accepted
    manifest = Manifest.open(tmp_path)
    assert manifest.decide("unet.plan", fields).reuse
    wider = ShapeProfile(max=ImageShape(4, 1536, 1536))
    cases = {
        "profile": engine_key_fields("unet", "a" * 64, wider, EngineOptions(), "10.3.0", H100),
        "precision": engine_key_fields("unet", "a" * 64, profile, EngineOptions("bf16"), "10.3.0", H100),
        "onnx": engine_key_fields("unet", "b" * 64, profile, EngineOptions(), "10.3.0", H100),
        "tensorrt": engine_key_fields("unet", "a" * 64, profile, EngineOptions(), "10.4.0", H100),
        "refittable": engine_key_fields("unet", "a" * 64, profile, EngineOptions(refittable=True), "10.3.0",
                                        H100),
    }
    for field, changed in cases.items():
        assert manifest.decide("unet.plan", changed).reason == f"stale: {field} changed"


def test_bad_options():
    with pytest.raises(ValueError, match="precision must be one of"):
        EngineOptions("int8")


def test_tensorrt_engines_match_torch(model_folder, tmp_path):
    """Needs TensorRT 10 and a GPU: builds the four engines of the small SD1 model and compares them."""
    try:
        import_tensorrt()
        import torch
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA GPU")
    except TensorRTUnavailable as err:
        pytest.skip(f"needs TensorRT 10 and a CUDA GPU: {err}")
    from runtime.backends.tensorrt_backend import prepare_tensorrt
    from runtime.weights import load_components
    from tests.export.conftest import SMALL_PROFILE

    folder = model_folder("sd1")
    reference = load_components(folder, device="cuda")
    deployed = prepare_tensorrt(load_components(folder, device="cuda"), engine_dir=tmp_path,
                                profile=SMALL_PROFILE, precision="fp32")
    sample = torch.randn(2, 4, 6, 10, device="cuda")
    context = torch.randn(2, 77, 64, device="cuda")
    with torch.no_grad():
        expected = reference.unet(sample, 500, context)
    for _ in range(2):  # the second call replays the captured graph
        got = deployed.unet(sample, 500, context)
        assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
    with pytest.raises(EngineMismatchError, match="outside the engine's profile"):
        deployed.vae.decode(torch.randn(1, 4, 32, 32, device="cuda"))
