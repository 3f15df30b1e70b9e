"""TensorRT: everything that does not need the library (profiles, metadata, compatibility and shape
checks, rebuild decisions) runs everywhere; building and running engines needs TensorRT and a GPU."""

import importlib.machinery
import json
import sys
import types
from types import SimpleNamespace

import pytest

from export.manifest import ArtifactError, Manifest
from export.specs import ImageShape, ShapeProfile, network_specs
from export.tensorrt import (
    EngineMismatchError,
    EngineOptions,
    TensorRTUnavailable,
    check_engine_compatible,
    check_shapes_in_profile,
    engine_key_fields,
    engine_metadata,
    import_tensorrt,
    metadata_path,
    profile_json,
    read_metadata,
)

SPECS = network_specs(
    SimpleNamespace(in_channels=4, out_channels=4, cross_attention_dim=768),
    SimpleNamespace(block_out_channels=(1, 2, 3, 4), latent_channels=4, in_channels=3, out_channels=3),
    SimpleNamespace(max_position_embeddings=77, hidden_size=768, vocab_size=49408),
)
H100 = {"compute_capability": "9.0", "name": "NVIDIA H100 80GB HBM3"}


def _meta(**overrides):
    meta = engine_metadata(
        SPECS["unet"], ShapeProfile(), EngineOptions(), tensorrt_version="10.3.0", gpu=H100, onnx_sha256="a" * 64
    )
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
    check_engine_compatible(
        meta, "unet.plan", tensorrt_version="10.3.0", compute_capability="9.0", onnx_sha256="a" * 64
    )
    with pytest.raises(EngineMismatchError, match="unet.plan was built by TensorRT 10.3.0 but TensorRT 10.8.0"):
        check_engine_compatible(meta, "unet.plan", tensorrt_version="10.8.0", compute_capability="9.0")
    with pytest.raises(EngineMismatchError, match=r"compute capability 9.0 \(NVIDIA H100.*this GPU is 8.9"):
        check_engine_compatible(meta, "unet.plan", tensorrt_version="10.3.0", compute_capability="8.9")
    with pytest.raises(EngineMismatchError, match="another model or export"):
        check_engine_compatible(
            meta, "unet.plan", tensorrt_version="10.3.0", compute_capability="9.0", onnx_sha256="b" * 64
        )


def test_shapes_outside_the_profile_are_refused():
    meta = _meta()
    inside = {"sample": (2, 4, 64, 96), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    check_shapes_in_profile(meta, inside, "unet.plan")
    with pytest.raises(
        EngineMismatchError,
        match=r"'sample' shape \[2, 4, 160, 64\] is outside .*"
        r"max \[8, 4, 128, 128\]",
    ):
        check_shapes_in_profile(meta, {**inside, "sample": (2, 4, 160, 64)}, "unet.plan")
    with pytest.raises(EngineMismatchError, match="outside"):
        check_shapes_in_profile(meta, {**inside, "timestep": (10,)}, "unet.plan")
    with pytest.raises(EngineMismatchError, match="has no input 'latent'"):
        check_shapes_in_profile(meta, {"latent": (1, 4, 8, 8)}, "unet.plan")


def test_a_context_past_the_profile_names_the_prompt_chunks_and_the_limit():
    meta = _meta()
    assert meta["profile"]["encoder_hidden_states"] == [[1, 77, 768], [2, 77, 768], [8, 231, 768]]
    shapes = {"sample": (2, 4, 64, 96), "timestep": (2,)}
    for tokens in (77, 154, 231):
        check_shapes_in_profile(meta, {**shapes, "encoder_hidden_states": (2, tokens, 768)}, "unet.plan")
    with pytest.raises(
        EngineMismatchError,
        match=r"unet.plan: a prompt of 4 chunks needs context length 4\*77 = 308; "
        r"this engine takes at most 231 \(3 chunks\)",
    ):
        check_shapes_in_profile(meta, {**shapes, "encoder_hidden_states": (2, 308, 768)}, "unet.plan")


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
        "refittable": engine_key_fields("unet", "a" * 64, profile, EngineOptions(refittable=True), "10.3.0", H100),
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
    deployed = prepare_tensorrt(
        load_components(folder, device="cuda"), engine_dir=tmp_path, profile=SMALL_PROFILE, precision="fp32"
    )
    sample = torch.randn(2, 4, 6, 10, device="cuda")
    context = torch.randn(2, 77, 64, device="cuda")
    with torch.no_grad():
        expected = reference.unet(sample, 500, context)
    for _ in range(2):  # the second call replays the captured graph
        got = deployed.unet(sample, 500, context)
        assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
    with pytest.raises(EngineMismatchError, match="outside the engine's profile"):
        deployed.vae.decode(torch.randn(1, 4, 32, 32, device="cuda"))


class _FakeTensorRT(types.ModuleType):
    """Stands in for the `tensorrt` module where only its version and a failing deserializer are used:
    what ensure_engines and load_engine decide before (or after) TensorRT does its real work."""

    __version__ = "10.3.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return None  # what TensorRT returns for bytes that are not an engine


def test_engines_are_reused_rebuilt_and_checked_on_load(model_folder, onnx_export, tmp_path, monkeypatch):
    """ensure_engines and load_engine with TensorRT faked and build_engine replaced: the caching
    decisions, metadata and load-time refusals; the build and the engine's run need the library."""
    import shutil

    import export.tensorrt as trt_export
    from tests.export.conftest import SMALL_PROFILE

    out = shutil.copytree(onnx_export("sd1"), tmp_path / "engines")  # the ONNX graphs are reused
    folder = model_folder("sd1")
    fake = _FakeTensorRT("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # for importers that probe specs
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    gpu = dict(H100)
    monkeypatch.setattr(trt_export, "current_gpu", lambda: dict(gpu))
    built = []

    def fake_build(onnx_path, plan_path, spec, profile, options, timing_cache_path, meta):
        built.append((plan_path.name, options.precision))
        plan_path.write_bytes(b"not an engine " + onnx_path.name.encode())
        metadata_path(plan_path).write_text(json.dumps(meta))
        timing_cache_path.write_bytes(b"timings")

    monkeypatch.setattr(trt_export, "build_engine", fake_build)
    build = dict(profile=SMALL_PROFILE, networks=["unet", "vae_decoder"], progress=False)
    plans = trt_export.ensure_engines(out, folder, **build)
    assert built == [("unet.plan", "fp16"), ("vae_decoder.plan", "fp16")]
    manifest = Manifest.open(out)  # plans, metadata and the shared timing cache all count as ours
    meta = read_metadata(plans["unet"])
    assert meta["onnx_sha256"] == manifest.artifacts["unet.onnx"]["files"]["unet.onnx"]["sha256"]
    assert meta["profile"]["sample"] == [[1, 4, 4, 4], [2, 4, 8, 8], [8, 4, 16, 16]]
    assert meta["tensorrt_version"] == "10.3.0" and meta["compute_capability"] == "9.0"
    assert meta["profile"]["encoder_hidden_states"] == [[1, 77, 64], [2, 77, 64], [8, 231, 64]]  # 1 .. 3 chunks

    trt_export.ensure_engines(out, folder, **build)
    assert len(built) == 2  # same inputs: nothing rebuilt
    trt_export.ensure_engines(out, folder, options=EngineOptions("bf16"), **build)
    assert built[2:] == [("unet.plan", "bf16"), ("vae_decoder.plan", "bf16")]

    gpu["compute_capability"] = "8.9"
    with pytest.raises(
        EngineMismatchError,
        match=r"unet.plan was built for GPU compute capability 9.0 .*"
        r"this GPU is 8.9",
    ):
        trt_export.load_engine(plans["unet"])
    gpu["compute_capability"] = "9.0"
    fake.__version__ = "10.8.0"
    with pytest.raises(EngineMismatchError, match="built by TensorRT 10.3.0 but TensorRT 10.8.0"):
        trt_export.load_engine(plans["unet"])
    fake.__version__ = "10.3.0"
    with pytest.raises(EngineMismatchError, match="another model or export"):
        trt_export.load_engine(plans["unet"], onnx_sha256="f" * 64)
    with pytest.raises(ArtifactError, match=r"could not deserialize .*unet.plan \(truncated or corrupt\)"):
        trt_export.load_engine(plans["unet"])
    plans["vae_decoder"].write_bytes(b"cut")
    with pytest.raises(ArtifactError, match=r"vae_decoder.plan is 3 bytes but manifest.json says"):
        trt_export.ensure_engines(out, folder, options=EngineOptions("bf16"), **build)


def test_a_tensorrt_unet_refuses_a_context_past_its_profile_naming_the_limit(
    model_folder, onnx_export, tmp_path, monkeypatch
):
    """The stand-in's path to the engine (DeployedUNet -> TensorRTNetwork.run) with an engine's metadata from
    ensure_engines (TensorRT faked): 4 chunks are refused before any TensorRT call; 100 tokens before that."""
    import shutil

    import torch

    import export.tensorrt as trt_export
    from export.onnx import stored_spec
    from runtime.backends.deployed import DeployedNetwork, DeployedUNet
    from runtime.backends.tensorrt_backend import TensorRTNetwork
    from tests.export.conftest import SMALL_PROFILE

    out = shutil.copytree(onnx_export("sd1"), tmp_path / "engines")
    fake = _FakeTensorRT("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "current_gpu", lambda: dict(H100))

    def fake_build(onnx_path, plan_path, spec, profile, options, timing_cache_path, meta):
        plan_path.write_bytes(b"not an engine")
        metadata_path(plan_path).write_text(json.dumps(meta))

    monkeypatch.setattr(trt_export, "build_engine", fake_build)
    build = dict(profile=SMALL_PROFILE, networks=["unet"], progress=False)
    plans = trt_export.ensure_engines(out, model_folder("sd1"), **build)
    network = TensorRTNetwork.__new__(TensorRTNetwork)  # no engine to load: only the checks before it run
    DeployedNetwork.__init__(network, stored_spec(Manifest.open(out), "unet"), "cpu", *[torch.float32] * 2)
    network.meta, network.graphs, network.plan_path = read_metadata(plans["unet"]), {}, plans["unet"]
    unet = DeployedUNet(network, config=None)
    sample = torch.randn(2, 4, 6, 8)
    with pytest.raises(
        EngineMismatchError,
        match=r"unet.plan: a prompt of 4 chunks needs context length 4\*77 = 308; "
        r"this engine takes at most 231 \(3 chunks\)",
    ):
        unet(sample, 400, torch.randn(2, 4 * 77, 64))
    with pytest.raises(ValueError, match="has 100 context tokens, which is not a multiple of 77"):
        unet(sample, 400, torch.randn(2, 100, 64))
