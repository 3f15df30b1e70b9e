"""LoRA on exported graphs: onnxruntime takes the merged weights from memory (a new session, no export),
TensorRT refits (the library faked here, as in test_tensorrt.py)."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import runtime
from export.manifest import Manifest
from export.tensorrt import EngineMismatchError, refit_engine
from runtime.backends.deployed import DeployedNetwork
from runtime.images import psnr
from runtime.weights import load_components
from tests.test_lora import TEXT_TARGETS, UNET_TARGETS, peft_lora, to_kohya

MIN_PSNR_DB = 30.0
RUN = dict(steps=3, seed=5, guidance=7.5, width=40, height=32, progress=False)


@pytest.fixture(scope="module")
def lora_file(model_folder, tmp_path_factory):
    """A kohya LoRA on the SD1 test model's UNet (attention, ff, 1x1 and 3x3 convs) and text encoder."""
    components = load_components(model_folder("sd1"))
    tensors = {
        **to_kohya(peft_lora(components.unet, UNET_TARGETS, seed=1), "lora_unet_", alpha=2.0),
        **to_kohya(peft_lora(components.text_encoder, TEXT_TARGETS, seed=2, magnitude=0.4), "lora_te_", alpha=2.0),
    }
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path


def test_onnxruntime_lora_matches_torch_and_unloads_exactly(model_folder, onnx_export, lora_file, capsys):
    folder, engine_dir = model_folder("sd1"), onnx_export("sd1")
    reference = runtime.load(folder, backend="torch")
    deployed = runtime.load(folder, backend="onnxruntime", engine_dir=engine_dir)
    files_before = sorted(p.name for p in engine_dir.iterdir())
    manifest_before = Manifest.open(engine_dir).artifacts
    base = deployed.generate("a red fox", **RUN)[0]
    assert all(_never_spin(network) for network in _ort_networks(deployed))

    start = time.perf_counter()
    name = deployed.load_lora(lora_file, scale=0.8)
    seconds = time.perf_counter() - start
    reference.load_lora(lora_file, scale=0.8)
    with capsys.disabled():
        print(f"\nonnxruntime LoRA load + apply (tiny SD1, UNet + text encoder): {seconds * 1e3:.0f} ms")
    expected, got = reference.generate("a red fox", **RUN)[0], deployed.generate("a red fox", **RUN)[0]
    assert psnr(expected, got) >= MIN_PSNR_DB
    assert psnr(base, got) < MIN_PSNR_DB  # the LoRA changed the image by more than the parity bound
    assert all(_never_spin(network) for network in _ort_networks(deployed))  # the sessions built for it too

    deployed.set_lora_scale(name, -0.5)
    reference.set_lora_scale(name, -0.5)
    assert psnr(reference.generate("a red fox", **RUN)[0], deployed.generate("a red fox", **RUN)[0]) >= MIN_PSNR_DB

    deployed.unload_lora()
    assert np.array_equal(np.asarray(deployed.generate("a red fox", **RUN)[0]), np.asarray(base))
    assert all(not network.overrides for network in _ort_networks(deployed))  # the file's own weights again
    # No export happened: the directory and its manifest are as they were.
    assert sorted(p.name for p in engine_dir.iterdir()) == files_before
    assert Manifest.open(engine_dir).artifacts == manifest_before


def _never_spin(network) -> bool:
    """Idle onnxruntime threads spinning would take the cores of torch's work in the same process."""
    options = network.session.get_session_options()
    return options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def _ort_networks(pipe):
    return [pipe.components.unet.network, pipe.components.text_encoder.network]


def test_a_weight_without_initializer_is_refused_before_any_change(model_folder, onnx_export, lora_file):
    deployed = runtime.load(model_folder("sd1"), backend="onnxruntime", engine_dir=onnx_export("sd1"))
    unet = deployed.components.unet
    unet.network.weight_map = {}  # as a graph exported before weight maps
    before = {k: v.clone() for k, v in unet.weights.state_dict().items()}
    with pytest.raises(ValueError, match="no separate initializer for .* export again"):
        deployed.load_lora(lora_file)
    assert all(torch.equal(v, before[k]) for k, v in unet.weights.state_dict().items())
    assert deployed.loras == {}


class _RecordingNetwork(DeployedNetwork):
    def __init__(self, weight_map):
        super().__init__(None, "cpu", torch.float32, torch.float16)
        self.weight_map, self.written = weight_map, []

    def set_initializers(self, arrays, restored=()):
        self.written.append((arrays, restored))


def test_weights_reach_the_engine_transposed_where_the_graph_stores_them_so():
    network = _RecordingNetwork({"a.weight": ("onnx::MatMul_7", True), "b.weight": ("b.weight", False)})
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, 2, 3, 3)
    network.write_weights({"a.weight": a, "b.weight": b}, restored=["b.weight"])
    ((arrays, restored),) = network.written
    assert restored == {"b.weight"}  # by initializer name
    assert arrays["onnx::MatMul_7"].shape == (3, 2) and arrays["onnx::MatMul_7"].dtype.name == "float16"
    assert (arrays["onnx::MatMul_7"] == a.t().numpy()).all() and arrays["b.weight"].shape == (4, 2, 3, 3)


class _FakeRefitter:
    """trt.Refitter's surface that refit_engine uses; it records what it is given."""

    def __init__(self, engine, logger):
        self.engine, self.set = engine, {}

    def get_all_weights(self):
        return list(self.engine["weights"])

    def set_named_weights(self, name, weights):
        self.set[name] = weights.array
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine(self):
        self.engine["weights"].update(self.set)
        self.engine["refits"] += 1
        return True


class _FakeTensorRT:
    __version__ = "10.3.0"
    Refitter = _FakeRefitter

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Weights:
        def __init__(self, array):
            self.array = array


def test_refit_engine_sets_named_weights_and_refits(monkeypatch):
    import export.tensorrt as trt_export

    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: _FakeTensorRT)
    engine = {"weights": {"onnx::MatMul_7": None, "conv.weight": None}, "refits": 0}
    new = np.ones((3, 2), dtype=np.float32)
    refit_engine(engine, {"onnx::MatMul_7": new}, "unet.plan")
    assert engine["refits"] == 1 and engine["weights"]["onnx::MatMul_7"] is new
    with pytest.raises(EngineMismatchError, match="unet.plan: TensorRT cannot refit weight 'other'"):
        refit_engine(engine, {"other": new}, "unet.plan")
    assert engine["refits"] == 1
