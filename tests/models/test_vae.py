"""Parity of our AutoencoderKL with diffusers' on perturbed random weights (fp32, CPU)."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from runtime.models.layers import AttentionCore, GroupNorm
from runtime.models.vae import AutoencoderKL, VAEConfig
from tests.models.conftest import perturb_, relative_error

TOLERANCE = 1e-5

# The SD VAE's shape (block_out_channels 128, 256, 512, 512; 2 layers) with channels shrunk.
SD_VAE_SMALL = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
    scaling_factor=0.18215,
)
# The optional parts switched off: no quant convs, no mid-block attention.
BARE_VAE_SMALL = dict(
    SD_VAE_SMALL,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    layers_per_block=1,
)


def build_pair(config_kwargs: dict, generator: torch.Generator):
    ref = DiffusersAutoencoderKL(**config_kwargs).eval()
    perturb_(ref, generator)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name,config_kwargs", [("sd", SD_VAE_SMALL), ("bare", BARE_VAE_SMALL)])
def test_decode_matches_diffusers(name, config_kwargs, generator):
    ref, ours = build_pair(config_kwargs, generator)
    z = torch.randn(2, 4, 5, 7, generator=generator)  # odd latent size
    with torch.no_grad():
        expected = ref.decode(z).sample
        actual = ours.decode(z)
    scale = 2 ** (len(config_kwargs["block_out_channels"]) - 1)
    assert actual.shape == (2, 3, 5 * scale, 7 * scale)
    error = relative_error(actual, expected)
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} (seed {generator.initial_seed()})"


@pytest.mark.parametrize("name,config_kwargs", [("sd", SD_VAE_SMALL), ("bare", BARE_VAE_SMALL)])
def test_encode_returns_the_unscaled_mean(name, config_kwargs, generator):
    ref, ours = build_pair(config_kwargs, generator)
    images = torch.rand(2, 3, 40, 56, generator=generator) * 2 - 1  # -> a 5x7 latent for 4 levels
    with torch.no_grad():
        expected = ref.encode(images).latent_dist.mean
        actual = ours.encode(images)
    error = relative_error(actual, expected)
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} (seed {generator.initial_seed()})"


def test_swappable_layers_are_used():
    ours = AutoencoderKL(VAEConfig.from_dict(SD_VAE_SMALL))
    assert not any(isinstance(m, torch.nn.SiLU) for m in ours.modules())
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    assert sum(isinstance(m, AttentionCore) for m in ours.modules()) == 2  # encoder and decoder mid blocks
    keys = set(ours.state_dict())
    assert "encoder.mid_block.attentions.0.group_norm.weight" in keys
    assert "decoder.mid_block.attentions.0.to_out.0.bias" in keys


def test_config_fields():
    config = VAEConfig.from_dict(
        dict(
            SD_VAE_SMALL,
            _class_name="AutoencoderKL",
            _diffusers_version="0.6.0",
            _name_or_path="x",
            force_upcast=True,
            shift_factor=None,
        )
    )
    assert config.scaling_factor == 0.18215
    assert config.force_upcast is True


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("shift_factor", 0.0609, "shift_factor"),
        ("latents_mean", [0.0] * 4, "latents_mean"),
        ("down_block_types", ["AttnDownEncoderBlock2D"] * 4, "AttnDownEncoderBlock2D"),
        ("up_block_types", ["UpDecoderBlock2D"] * 3, "up_block_types"),
        ("act_fn", "relu", "act_fn"),
        ("norm_num_groups", 5, "norm_num_groups"),
        ("use_tiling_magic", True, "use_tiling_magic"),
        ("_class_name", "UNet2DConditionModel", "_class_name"),
    ],
)
def test_unsupported_config_is_rejected_clearly(field, value, message):
    raw = dict(SD_VAE_SMALL)
    raw[field] = value
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict(raw)


def test_bad_input_shapes_are_named():
    ours = AutoencoderKL(VAEConfig.from_dict(BARE_VAE_SMALL))
    with pytest.raises(ValueError, match="decode"):
        ours.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="encode"):
        ours.encode(torch.randn(1, 4, 16, 16))
