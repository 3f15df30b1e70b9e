"""Textual inversion on SDXL (runtime/conditioning.py): an SDXL embedding file holds clip_l and clip_g vectors,
each encoder takes its own part over the name's token slots, and the context equals diffusers' after
load_textual_inversion of each part into its encoder (fp32, CPU)."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

import runtime
from runtime.embeddings import EmbeddingError, EmbeddingLibrary
from tests.sdxl_factory import save_sdxl_folder

NAME = "inkstyle"
COUNT = 4  # vectors: more token slots than the name's own tokens, so what follows the name moves


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl_ti") / "base", "sdxl", seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    return runtime.load(folder)


def _parts(pipe) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    (_, clip_l), (_, clip_g) = pipe.conditioner.encoders
    widths = {"clip_l": clip_l.config.hidden_size, "clip_g": clip_g.text_model.config.hidden_size}
    return {key: torch.randn(COUNT, width, generator=generator) for key, width in widths.items()}


@pytest.fixture(scope="module")
def library(pipe, tmp_path_factory):
    embeddings = tmp_path_factory.mktemp("embeddings")
    save_file(_parts(pipe), str(embeddings / f"{NAME}.safetensors"))
    return EmbeddingLibrary(embeddings)


def _encode(pipe, prompt, library):
    with torch.no_grad():
        return pipe.conditioner.encode(
            [prompt], [""], True, False, 1, "cpu", torch.float32, syntax="a1111", embeddings=library
        )


def test_each_encoder_reads_its_part_as_diffusers_does(pipe, folder, library):
    prompt = f"a photo of {NAME}, snow"
    context, pooled = _encode(pipe, prompt, library)
    reference = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    parts = _parts(pipe)
    reference.load_textual_inversion(
        parts["clip_l"], token=NAME, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer
    )
    reference.load_textual_inversion(
        parts["clip_g"], token=NAME, text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2
    )
    with torch.no_grad():
        expected, _, _, _ = reference.encode_prompt(prompt, do_classifier_free_guidance=False)
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    # The pooled state is not compared: these configs' legacy eos_token_id = 2 makes transformers pool at
    # the largest id, which diffusers' added tokens are; A1111 adds no tokens and pools at the end of text.
    without, pooled_without = _encode(pipe, prompt, None)
    assert not torch.allclose(context, without) and not torch.allclose(pooled, pooled_without)


def test_the_batch_key_counts_the_names_slots(pipe, library):
    tokenizer = pipe.conditioner.encoders[0][0]
    name_tokens = len(tokenizer.token_ids([NAME])[0])
    assert name_tokens < COUNT
    prompt = "cat " * (75 - name_tokens) + NAME  # one 75-token chunk as text, two with the name's slots
    assert _encode(pipe, prompt, library)[0].shape[1] == 2 * 77
    request = runtime.GenerationRequest(prompt=prompt, steps=2, width=64, height=64)
    assert request.batch_key(pipe).context_tokens == 77
    pipe.embeddings_dir = library.folder
    try:
        assert request.batch_key(pipe).context_tokens == 2 * 77
        image = pipe.generate(prompt, steps=2, width=64, height=64, guidance=2.0, seed=0, progress=False)[0]
        assert image.size == (64, 64)
    finally:
        pipe.embeddings_dir = None


def test_an_sd1_embedding_on_sdxl_is_named(pipe, tmp_path):
    save_file({"emb_params": torch.randn(1, 8)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(EmbeddingError, match="old.safetensors.*single-encoder|old.safetensors.*clip_l"):
        _encode(pipe, "a photo of old", EmbeddingLibrary(tmp_path))
