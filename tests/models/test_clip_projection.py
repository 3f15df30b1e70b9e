"""SDXL's text-encoder outputs against transformers: penultimate hidden state, pooled state, text_embeds.

CLIPTextModel (SDXL's CLIP ViT-L) and CLIPTextModelWithProjection (OpenCLIP ViT-bigG) on perturbed
random weights, at small configs and (slow) at the full SDXL configs.
"""

import pytest
import torch
import transformers

from runtime.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from tests import seeding

# diffusers' stable-diffusion-xl-base-1.0 text_encoder_2/config.json (written by transformers 4.32), without
# its "torch_dtype": "float16", which would make transformers build the fp32 reference in fp16.
SDXL_TEXT_ENCODER_2_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}
# text_encoder/config.json of the same repository (OpenAI CLIP ViT-L/14).
SDXL_TEXT_ENCODER_CONFIG = {
    **SDXL_TEXT_ENCODER_2_CONFIG,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}


def _small(eos_token_id: int, hidden_act: str = "gelu") -> dict:
    # Odd head count, a width that is not a power of two, a projection of another width.
    return {
        "vocab_size": 1000,
        "hidden_size": 96,
        "intermediate_size": 200,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "max_position_embeddings": 77,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": eos_token_id,
        "pad_token_id": 1,
        "projection_dim": 40,
    }


def _perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _ids(config: dict, batch: int, seed: int, eos: int) -> torch.Tensor:
    """Prompt-like rows: begin token, words, one end-of-text, then padding (id 0 or eos), as tokenizers give."""
    generator = torch.Generator().manual_seed(seed)
    vocab = config["vocab_size"]
    ids = torch.randint(1, eos, (batch, 77), generator=generator)
    for row, length in enumerate(torch.randint(3, 70, (batch,), generator=generator).tolist()):
        ids[row, length] = eos
        ids[row, length + 1 :] = eos if row % 2 else 0  # SD 1.x pads with end-of-text, SDXL's encoder 2 with "!"
    assert ids.max() < vocab
    return ids


def _relative(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _assert_projection_parity(config: dict, batch: int, seed: int, tolerance: float = 1e-5):
    with seeding.global_rng(seed):
        reference = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)).eval()
    _perturb(reference, seed)
    ours = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    eos = config["vocab_size"] - 1
    ids = _ids(config, batch, seed, eos)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        penultimate, text_embeds = ours.penultimate_and_pooled(ids)
        last = ours(ids)
    assert penultimate.shape == (batch, 77, config["hidden_size"])
    assert text_embeds.shape == (batch, config["projection_dim"])
    assert _relative(penultimate, expected.hidden_states[-2]) <= tolerance
    assert _relative(text_embeds, expected.text_embeds) <= tolerance
    assert _relative(last, expected.last_hidden_state) <= tolerance
    del reference, ours


# 2: transformers < 4.31 configs (pool at the largest id); 999: the real end-of-text id of these configs.
@pytest.mark.parametrize("eos_token_id", [2, 999])
def test_projection_model_matches_transformers_small(eos_token_id):
    _assert_projection_parity(_small(eos_token_id), batch=3, seed=5)


@pytest.mark.parametrize("eos_token_id", [2, 999])
def test_clip_model_penultimate_and_pooled_match_transformers(eos_token_id):
    config = _small(eos_token_id, "quick_gelu")
    with seeding.global_rng(6):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    _perturb(reference, 6)
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ids = _ids(config, 4, 6, 999)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        penultimate, pooled = ours.penultimate_and_pooled(ids)
    assert _relative(penultimate, expected.hidden_states[-2]) <= 1e-5
    assert _relative(pooled, expected.pooler_output) <= 1e-5


def test_projection_state_dict_keys_equal_transformers():
    config = _small(2)
    reference = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config))
    ours = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert "text_projection.weight" in ours.state_dict()


def test_one_layer_penultimate_is_the_embedding():
    config = {**_small(2), "num_hidden_layers": 1}
    model = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    ids = torch.randint(0, 999, (2, 77))
    with torch.no_grad():
        penultimate, _ = model.penultimate_and_pooled(ids)
        torch.testing.assert_close(penultimate, model.embeddings(ids), rtol=0, atol=0)


def test_bad_projection_dim_names_the_field():
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPTextConfig.from_dict({**_small(2), "projection_dim": 0})


@pytest.mark.slow
def test_full_sdxl_text_encoder_2_matches_transformers():
    """OpenCLIP ViT-bigG at its real size (~695M parameters, two fp32 copies ~5.6 GB)."""
    _assert_projection_parity(SDXL_TEXT_ENCODER_2_CONFIG, batch=2, seed=7)


@pytest.mark.slow
def test_full_sdxl_text_encoder_matches_transformers():
    config = SDXL_TEXT_ENCODER_CONFIG
    with seeding.global_rng(8):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    _perturb(reference, 8)
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ids = _ids(config, 2, 8, config["vocab_size"] - 1)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        penultimate, pooled = ours.penultimate_and_pooled(ids)
    assert _relative(penultimate, expected.hidden_states[-2]) <= 1e-5
    assert _relative(pooled, expected.pooler_output) <= 1e-5
