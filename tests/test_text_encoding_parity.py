"""Against diffusers, on an SD1-shaped folder whose text encoder has 4 layers (the factory's has 2, too few
for clip_skip=2 to mean anything): clip_skip=2 and textual-inversion embeddings."""

import shutil
import types

import pytest
import torch
from safetensors.torch import save_file

import runtime
from runtime.images import psnr
from tests.model_factory import perturb_, save_diffusers_folder, small_configs

MIN_PSNR_DB = 35.0
LAYERS = 4
RUN = dict(num_inference_steps=2, guidance_scale=7.5, width=32, height=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = save_diffusers_folder(tmp_path_factory.mktemp("deep_text") / "model", kind="sd1", seed=0)
    config = dict(small_configs("sd1")["text_encoder"], num_hidden_layers=LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        encoder = CLIPTextModel(CLIPTextConfig(**config))
    perturb_(encoder, torch.Generator().manual_seed(8)).eval()
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    # diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm, a name transformers 5 dropped
    # (the LayerNorm now sits on the model itself): point the old name at it so diffusers' own code runs.
    pipe.text_encoder.text_model = types.SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
    return pipe


def test_clip_skip_2_matches_diffusers(folder, reference):
    ours = runtime.load(folder, backend="torch", device="cpu", dtype="fp32")
    assert len(ours.text_encoder.encoder.layers) == LAYERS
    prompt = "a red fox in the snow"
    with torch.no_grad():
        expected = reference.encode_prompt(prompt, "cpu", 1, False, clip_skip=2)[0]
    got = ours.encode_prompt([prompt], None, 1.0, clip_skip=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ours.encode_prompt([prompt], None, 1.0, clip_skip=1), atol=1e-3)
    image = ours(prompt, clip_skip=2, generator=torch.Generator().manual_seed(4), **RUN).images[0]
    reference_image = reference(prompt, clip_skip=2, generator=torch.Generator().manual_seed(4), **RUN).images[0]
    value = psnr(image, reference_image)
    print(f"clip_skip=2 image vs diffusers: {value:.1f} dB")
    assert value >= MIN_PSNR_DB


def test_a_multi_vector_embedding_matches_diffusers_load_textual_inversion(folder, reference, tmp_path):
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    vectors = 0.5 * torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    save_file({"emb_params": vectors}, str(embeddings / "inkstyle.safetensors"))
    ours = runtime.load(folder, backend="torch", device="cpu", dtype="fp32", embeddings_dir=embeddings)
    reference.load_textual_inversion(str(embeddings / "inkstyle.safetensors"), token="inkstyle")
    try:
        prompt = "a photo of inkstyle, a fox"
        with torch.no_grad():
            expected = reference.encode_prompt(prompt, "cpu", 1, False)[0]
        got = ours.encode_prompt([prompt], None, 1.0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_prompt(["a photo of <inkstyle>, a fox"], None, 1.0), got)
        without = runtime.load(folder, backend="torch", device="cpu", dtype="fp32").encode_prompt([prompt], None, 1.0)
        assert torch.equal(got[0, :4], without[0, :4])  # before the name: untouched (causal attention)
        assert not torch.allclose(got, without, atol=1e-3)
    finally:
        reference.unload_textual_inversion()
