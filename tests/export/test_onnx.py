"""ONNX export: every network of small SD1/SD2 models exports, passes onnx.checker, and onnxruntime's
output matches the torch module at a batch and size other than the traced sample."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.manifest import Manifest
from export.onnx import ensure_onnx, export_network, network_module, reference_layers, specs_of
from export.specs import NETWORKS_OF, ImageShape
from runtime.weights import load_components
from tests.export.conftest import CHECK_SHAPE, SMALL_PROFILE


def _run_both(path, module, spec, shape, dtype=torch.float32, seed=1):
    inputs = spec.sample_inputs(shape, dtype=dtype, seed=seed)
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in zip(spec.input_names, inputs)})
    return [e.float().numpy() for e in expected], got


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_every_network_exports_and_matches_torch_at_another_shape(kind, model_folder, onnx_export):
    components = load_components(model_folder(kind))
    paths = {name: onnx_export(kind) / f"{name}.onnx" for name in NETWORKS_OF[kind]}
    specs = specs_of(components)
    for name in NETWORKS_OF[kind]:
        path, spec = paths[name], specs[name]
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == spec.input_names
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
        batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param == "batch", f"{name}: batch axis is not dynamic"
        # The second shape's latent (5x7) is odd: the UNet must upsample to its skips' sizes.
        for shape in (CHECK_SHAPE, ImageShape(1, 40, 56)):
            expected, got = _run_both(path, network_module(components, name), spec, shape)
            for e, g in zip(expected, got):
                assert g.shape == e.shape
                relative = np.abs(g - e).max() / np.abs(e).max()
                assert relative <= 1e-4, f"{kind} {name} at {shape}: relative error {relative:.2e}"


def test_fp16_export_passes_the_checker_and_runs(model_folder, tmp_path):
    folder = model_folder("sd1")
    components = load_components(folder, dtype=torch.float16)
    paths = ensure_onnx(tmp_path, folder, dtype="fp16", components=components, profile=SMALL_PROFILE, progress=False)
    specs = specs_of(components)
    for name in NETWORKS_OF["sd1"]:
        model = onnx.load(str(paths[name]))
        assert model.graph.input[-1].type.tensor_type.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64)
        expected, got = _run_both(
            paths[name], network_module(components, name), specs[name], ImageShape(1, 40, 56), dtype=torch.float16
        )
        relative = np.abs(got[0].astype(np.float32) - expected[0]).max() / np.abs(expected[0]).max()
        assert relative <= 2e-2, f"fp16 {name}: relative error {relative:.2e}"
    assert Manifest.open(tmp_path).artifacts["unet.onnx"]["key_fields"]["dtype"] == "fp16"


def test_export_uses_reference_layers_even_after_the_triton_backend(model_folder, tmp_path):
    from runtime.backends.triton_backend import prepare_triton
    from runtime.backends.triton_gemm import TritonTransformer2D
    from runtime.backends.triton_layers import TritonAttentionCore, TritonGEGLU, TritonGroupNorm
    from runtime.backends.triton_transformer import TritonTransformerBlock

    components = prepare_triton(load_components(model_folder("sd1")), channels_last=False)
    spec = specs_of(components)["unet"]
    module = network_module(components, "unet")
    with reference_layers(module):
        substitutes = (TritonGroupNorm, TritonAttentionCore, TritonGEGLU, TritonTransformerBlock, TritonTransformer2D)
        assert not any(isinstance(m, substitutes) for m in module.modules())
    # Restored afterwards: the user's model keeps its kernels.
    assert any(isinstance(m, TritonGroupNorm) for m in module.modules())
    assert any(isinstance(m, TritonTransformer2D) for m in module.modules())
    export_network(module, spec, tmp_path, sample=ImageShape(1, 64, 64))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "unet.onnx")).graph.node}
    assert "InstanceNormalization" in ops and "Softmax" in ops
    assert any(isinstance(m, TritonAttentionCore) for m in module.modules())


@pytest.mark.slow
def test_full_sd15_unet_exports_with_external_data(tmp_path):
    """The real 859.5M-parameter UNet (random weights, fp32, 3.4 GB): weights go to unet.onnx.data,
    the path-based checker accepts it (export_network runs it)."""
    import gc
    from types import SimpleNamespace

    from export.specs import unet_spec
    from runtime import default_configs
    from runtime.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig.from_dict(default_configs.default_configs("sd1")["unet"])).eval()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    spec = unet_spec(unet.config, SimpleNamespace(block_out_channels=(128, 256, 512, 512)))
    module = network_module(SimpleNamespace(unet=unet, vae=None, text_encoder=None), "unet")
    try:
        files = export_network(module, spec, tmp_path, sample=ImageShape(1, 64, 64))
        assert files == ["unet.onnx", "unet.onnx.data"]
        assert (tmp_path / "unet.onnx").stat().st_size < 50_000_000
        assert (tmp_path / "unet.onnx.data").stat().st_size > 3_400_000_000
        onnx.checker.check_model(str(tmp_path / "unet.onnx"))
    finally:
        del module, unet
        gc.collect()
        for path in tmp_path.iterdir():
            path.unlink()
