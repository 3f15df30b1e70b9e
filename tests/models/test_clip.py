"""Our CLIP text encoder against transformers' CLIPTextModel on perturbed random weights."""

import pytest
import torch
import transformers

from runtime.models.clip import CLIPTextConfig, CLIPTextModel
from tests import seeding

# diffusers' text_encoder/config.json of SD 1.5 (OpenAI CLIP ViT-L/14, written by transformers 4.x).
SD15_TEXT_ENCODER_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}
# SD 2.x (OpenCLIP ViT-H/14 text tower, 23 of its 24 layers, exact GELU).
SD2_TEXT_ENCODER_CONFIG = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "transformers_version": "4.25.0.dev0",
}


def _small_config(hidden_act: str) -> dict:
    # Odd head count and a width that is not a power of two, to catch head-split mistakes.
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
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _perturbed_reference(config: dict, seed: int) -> transformers.CLIPTextModel:
    with seeding.global_rng(seed), torch.no_grad():
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
        # LayerNorms start at identity and biases at zero: move every parameter so none hides a bug.
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return reference


def _assert_parity(config: dict, batch: int, seed: int):
    reference = _perturbed_reference(config, seed)
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ids = torch.randint(0, config["vocab_size"], (batch, 77), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        actual = ours(ids)
    assert actual.shape == (batch, 77, config["hidden_size"])
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative <= 1e-5, f"max|delta|/max|ref| = {relative:.3g}"


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers_small(hidden_act):
    _assert_parity(_small_config(hidden_act), batch=3, seed=1 if hidden_act == "gelu" else 2)


def test_matches_transformers_full_sd15():
    _assert_parity(SD15_TEXT_ENCODER_CONFIG, batch=2, seed=3)


def test_state_dict_keys_equal_transformers():
    config = _small_config("quick_gelu")
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config))
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert not any(k.startswith("text_model.") or k.endswith("position_ids") for k in ours.state_dict())


def test_attention_is_causal():
    with seeding.global_rng(4):
        model = CLIPTextModel(CLIPTextConfig.from_dict(_small_config("gelu"))).eval()
        ids = torch.randint(0, 1000, (1, 77))
    changed = ids.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % 1000
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40], rtol=0, atol=0)
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_sd_configs_parse():
    sd1 = CLIPTextConfig.from_dict(SD15_TEXT_ENCODER_CONFIG)
    sd2 = CLIPTextConfig.from_dict(SD2_TEXT_ENCODER_CONFIG)
    assert (sd1.hidden_size, sd1.num_hidden_layers, sd1.hidden_act, sd1.head_dim) == (768, 12, "quick_gelu", 64)
    assert (sd2.hidden_size, sd2.num_hidden_layers, sd2.hidden_act, sd2.head_dim) == (1024, 23, "gelu", 64)


def test_every_key_transformers_writes_is_accepted():
    written = transformers.CLIPTextConfig(**_small_config("gelu")).to_dict()
    assert CLIPTextConfig.from_dict(written) == CLIPTextConfig.from_dict(_small_config("gelu"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_act", "relu", "hidden_act"),
        ("use_rotary_embeddings", True, "use_rotary_embeddings"),
        ("model_type", "clip_vision_model", "model_type"),
        ("num_attention_heads", 7, "num_attention_heads"),
        ("hidden_size", "768", "hidden_size"),
        ("layer_norm_eps", 0.0, "layer_norm_eps"),
    ],
)
def test_bad_config_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        CLIPTextConfig.from_dict({**SD15_TEXT_ENCODER_CONFIG, key: value})


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.rand(1, 77), "int64 or int32"),
        (torch.randint(0, 1000, (77,)), "batch, tokens"),
        (torch.randint(0, 1000, (1, 78)), "max_position_embeddings"),
    ],
)
def test_bad_input_ids_give_clear_errors(ids, message):
    model = CLIPTextModel(CLIPTextConfig.from_dict(_small_config("gelu")))
    with pytest.raises(ValueError, match=message):
        model(ids)
