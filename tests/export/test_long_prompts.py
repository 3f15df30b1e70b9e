"""Long prompts on the exported UNet: a context of K x 77 tokens (A1111 chunks, BREAK) runs on onnxruntime
and gives the torch backend's image; the graph's context axis is symbolic; other lengths are refused."""

import onnx
import pytest
import torch

import runtime
from runtime.images import psnr

MIN_PSNR_DB = 35.0
# The tiny tokenizer's words are one token each: 80 words take two chunks, 160 three.
TWO_CHUNKS = " ".join(["a red bicycle by the sea"] * 14)
THREE_CHUNKS = " ".join(["a red bicycle by the sea"] * 27)
WITH_BREAK = "a red bicycle BREAK by the sea at dusk"


@pytest.fixture(scope="module")
def pipes(model_folder, onnx_export):
    folder = model_folder("sd1")
    deployed = runtime.load(folder, backend="onnxruntime", engine_dir=onnx_export("sd1"))
    return runtime.load(folder, backend="torch"), deployed


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_the_unet_graph_has_a_symbolic_context_axis(kind, onnx_export):
    graph = onnx.load(str(onnx_export(kind) / "unet.onnx"), load_external_data=False).graph
    context = next(value for value in graph.input if value.name == "encoder_hidden_states")
    dims = context.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param] == ["batch", "context_tokens"] and dims[2].dim_value == 64


@pytest.mark.parametrize(
    "prompt, negative, chunks",
    [(TWO_CHUNKS, "blurry", 2), (THREE_CHUNKS, TWO_CHUNKS, 3), (WITH_BREAK, "blurry", 2)],
    ids=["two-chunks", "three-chunks", "break"],
)
def test_long_prompts_give_the_torch_backends_image(pipes, prompt, negative, chunks):
    reference, deployed = pipes
    context = deployed.encode_prompt([prompt], [negative], guidance=7.5)
    assert context.shape[1] == chunks * 77  # the case is what it says it is
    options = dict(steps=3, guidance=7.5, width=64, height=48, seed=5, progress=False)
    expected = reference.generate(prompt, negative_prompt=negative, **options)
    got = deployed.generate(prompt, negative_prompt=negative, **options)
    short = deployed.generate("a red bicycle", negative_prompt=negative, **options)
    assert psnr(expected[0], got[0]) >= MIN_PSNR_DB
    # The tiny model's images move little with the text (BREAK case: 39.7 dB from the short prompt's image,
    # 87.8 dB from torch's): the later chunks must still move the image far more than the backend does.
    assert psnr(short[0], got[0]) < psnr(expected[0], got[0]) - 20.0, "the long prompt's later chunks did nothing"


def test_a_context_that_is_not_whole_chunks_is_refused_before_the_run(pipes):
    unet = pipes[1].components.unet
    sample = torch.randn(2, 4, 6, 8)
    assert unet(sample, 400, torch.randn(2, 154, 64)).shape == sample.shape
    for tokens in (76, 100, 155):
        with pytest.raises(ValueError, match=f"unet: input 'encoder_hidden_states' has {tokens} context tokens, "):
            unet(sample, 400, torch.randn(2, tokens, 64))
