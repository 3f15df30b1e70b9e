"""The onnxruntime backend: exported graphs behind the modules' call signatures, in the pipeline."""

import shutil

import pytest
import torch

import runtime
from export.manifest import ArtifactError, Manifest
from runtime.backends.deployed import DeployedUNet, timestep_batch
from runtime.images import psnr
from runtime.weights import load_components


def _deployed(folder, engine_dir):
    """The onnxruntime backend's components, through the public entry point."""
    return runtime.load(folder, backend="onnxruntime", engine_dir=engine_dir).components


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_images_match_the_torch_backend(kind, model_folder, onnx_export):
    folder = model_folder(kind)
    reference = runtime.load(folder, backend="torch")
    deployed = runtime.load(folder, backend="onnxruntime", engine_dir=onnx_export(kind))
    assert isinstance(deployed.components.unet, DeployedUNet) and deployed.backend == "onnxruntime"
    options = dict(steps=3, guidance=7.5, width=64, height=48, seed=123, num_images=2, progress=False)
    expected = reference.generate("a red bicycle by the sea", negative_prompt="blurry", **options)
    got = deployed.generate("a red bicycle by the sea", negative_prompt="blurry", **options)
    for e, g in zip(expected, got):
        assert psnr(e, g) >= 30.0
    init = expected[0]
    expected = reference.img2img(init, "a blue bicycle", strength=0.6, **options)
    got = deployed.img2img(init, "a blue bicycle", strength=0.6, **options)
    assert psnr(expected[1], got[1]) >= 30.0


def test_networks_keep_signatures_and_configs(model_folder, onnx_export):
    folder = model_folder("sd1")
    torch_side = load_components(folder)
    deployed = _deployed(folder, onnx_export("sd1"))
    assert deployed.unet.config is not torch_side.unet.config and deployed.unet.config == torch_side.unet.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 5, 7, generator=generator)
    context = torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        expected = torch_side.unet(sample, torch.tensor([400, 400]), context)
    for timestep in (400, torch.tensor(400), torch.tensor([400.0, 400.0]), torch.tensor([400])):
        got = deployed.unet(sample, timestep, context)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    with pytest.raises(ValueError, match="timestep has 3 values but the sample batch is 2"):
        deployed.unet(sample, torch.tensor([1, 2, 3]), context)
    images = torch.rand(1, 3, 40, 56, generator=generator) * 2 - 1
    mean, logvar = deployed.vae.encode_moments(images)
    with torch.no_grad():
        assert torch.allclose(deployed.vae.encode(images), torch_side.vae.encode(images), atol=1e-4)
    assert mean.shape == logvar.shape == (1, 4, 5, 7) and not torch.equal(mean, logvar)
    ids = torch.randint(0, 49408, (3, 77), generator=generator)
    with torch.no_grad():
        assert torch.allclose(deployed.text_encoder(ids), torch_side.text_encoder(ids), atol=1e-4)


def test_timestep_batch_normalises_every_form():
    assert timestep_batch(7, 3, "cpu").tolist() == [7.0, 7.0, 7.0]
    assert timestep_batch(torch.tensor(7), 2, "cpu").dtype == torch.float32
    assert timestep_batch(torch.tensor([1, 2]), 2, "cpu").tolist() == [1.0, 2.0]


def test_reuse_then_stale_weights_reexport(model_folder, tmp_path):
    folder = shutil.copytree(model_folder("sd1"), tmp_path / "model")
    engine_dir = tmp_path / "engines"
    _deployed(folder, engine_dir)  # empty dir: exports
    before = Manifest.open(engine_dir).artifacts
    _deployed(folder, engine_dir)  # same inputs: reused, files untouched
    assert Manifest.open(engine_dir).artifacts == before
    # New VAE weights (same shapes): only the two VAE graphs are rebuilt.
    from safetensors.torch import load_file, save_file

    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, str(weights))
    _deployed(folder, engine_dir)
    after = Manifest.open(engine_dir).artifacts
    changed = {name for name in after if after[name]["key"] != before[name]["key"]}
    assert changed == {"vae_decoder.onnx", "vae_encoder.onnx"}


def test_damaged_graph_is_refused_with_its_name(model_folder, onnx_export, tmp_path):
    engine_dir = shutil.copytree(onnx_export("sd1"), tmp_path / "engines")
    graph = engine_dir / "unet.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"unet.onnx is \d+ bytes but manifest.json says"):
        _deployed(model_folder("sd1"), engine_dir)


def test_engine_dir_is_required(model_folder):
    with pytest.raises(ValueError, match="backend='onnxruntime' needs engine_dir"):
        runtime.load(model_folder("sd1"), backend="onnxruntime")


def test_engine_dir_with_unrelated_files_is_refused_untouched(model_folder, tmp_path):
    (tmp_path / "unet.onnx").write_bytes(b"someone else's graph")
    with pytest.raises(ArtifactError, match=r"refusing to write into .*unet.onnx.*no manifest.json of ours"):
        runtime.load(model_folder("sd1"), backend="onnxruntime", engine_dir=tmp_path)
    assert (tmp_path / "unet.onnx").read_bytes() == b"someone else's graph"
