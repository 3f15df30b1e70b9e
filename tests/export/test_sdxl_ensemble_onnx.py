"""SDXL on onnxruntime with both pipelines exported: the base + refiner ensemble, short and long (2-chunk)
prompts, against the torch backend's ensemble; and the symbolic context axis of both UNet graphs."""

import onnx
import pytest

import runtime
from runtime.images import psnr

MIN_PSNR_DB = 35.0
LONG_PROMPT = " ".join(["a fox at dawn in the snow"] * 14)  # 84 tokens: two chunks
OPTIONS = dict(negative_prompt="blurry", steps=8, guidance=5.0, seed=12, width=64, height=48, num_images=2)


@pytest.fixture(scope="module")
def pipes(sdxl_folder, sdxl_export, refiner_folder, refiner_export):
    """(torch base, torch refiner), (onnxruntime base, onnxruntime refiner)."""
    torch_side = runtime.load(sdxl_folder), runtime.load(refiner_folder)
    deployed = (
        runtime.load(sdxl_folder, backend="onnxruntime", engine_dir=sdxl_export),
        runtime.load(refiner_folder, backend="onnxruntime", engine_dir=refiner_export),
    )
    return torch_side, deployed


@pytest.mark.parametrize("which, width", [("base", 192), ("refiner", 128)])
def test_both_unet_graphs_have_a_symbolic_context_axis(which, width, sdxl_export, refiner_export):
    out = sdxl_export if which == "base" else refiner_export
    graph = onnx.load(str(out / "unet.onnx"), load_external_data=False).graph
    context = next(value for value in graph.input if value.name == "encoder_hidden_states")
    dims = context.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "context_tokens", width]


@pytest.mark.parametrize("prompt, chunks", [("a fox at dawn", 1), (LONG_PROMPT, 2)], ids=["short", "long"])
def test_the_ensemble_on_onnxruntime_gives_the_torch_backends_images(pipes, prompt, chunks):
    (torch_base, torch_refiner), (base, refiner) = pipes
    assert base.encode_prompt([prompt], ["blurry"], guidance=5.0).shape[1] == chunks * 77
    assert refiner.encode_prompt([prompt], ["blurry"], guidance=5.0).shape[1] == chunks * 77
    expected = torch_base.generate(prompt, refiner=torch_refiner, refiner_start=0.8, progress=False, **OPTIONS)
    got = base.generate(prompt, refiner=refiner, refiner_start=0.8, progress=False, **OPTIONS)
    for e, g in zip(expected, got):
        assert psnr(e, g) >= MIN_PSNR_DB
    alone = base.generate(prompt, progress=False, **OPTIONS)
    assert psnr(alone[0], got[0]) < MIN_PSNR_DB, "the refiner changed nothing"
