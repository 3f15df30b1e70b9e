"""Network specs: shape parsing, profiles (guided batch doubling), binding shapes, sample inputs."""

from types import SimpleNamespace

import pytest
import torch

from export.specs import ImageShape, NetworkSpec, ShapeProfile, network_specs

UNET = SimpleNamespace(in_channels=9, out_channels=4, cross_attention_dim=768)
VAE = SimpleNamespace(block_out_channels=(128, 256, 512, 512), latent_channels=4, in_channels=3, out_channels=3)
TEXT = SimpleNamespace(max_position_embeddings=77, hidden_size=768, vocab_size=49408)


@pytest.fixture
def specs():
    return network_specs(UNET, VAE, TEXT)


def test_image_shape_parse_and_errors():
    assert ImageShape.parse("2x512X768") == ImageShape(2, 512, 768)
    assert str(ImageShape(1, 64, 48)) == "1x64x48"
    for bad in ("512x512", "1x512x", "axbxc", "0x512x512"):
        with pytest.raises(ValueError, match="BxHxW|positive"):
            ImageShape.parse(bad)


def test_profile_order_and_factor_are_checked():
    with pytest.raises(ValueError, match="height: need min <= opt <= max"):
        ShapeProfile(ImageShape(1, 512, 512), ImageShape(1, 256, 512), ImageShape(1, 1024, 1024))
    profile = ShapeProfile(ImageShape(1, 260, 256), ImageShape(1, 512, 512), ImageShape(1, 1024, 1024))
    with pytest.raises(ValueError, match="min 1x260x256.*multiples of the VAE factor 8"):
        network_specs(UNET, VAE, TEXT)["unet"].profile_shapes(profile)


def test_default_profile_of_the_guided_unet(specs):
    shapes = specs["unet"].profile_shapes(ShapeProfile())
    # min keeps one image (guidance <= 1 runs the conditional half only); opt and max are doubled.
    assert shapes["sample"] == ((1, 9, 32, 32), (2, 9, 64, 64), (8, 9, 128, 128))
    assert shapes["timestep"] == ((1,), (2,), (8,))
    # The context: one prompt chunk at min and opt, three (231 tokens) at max.
    assert shapes["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 231, 768))
    assert specs["text_encoder"].profile_shapes(ShapeProfile())["input_ids"] == ((1, 77), (2, 77), (8, 77))


def test_vae_profiles_use_the_image_batch(specs):
    profile = ShapeProfile(ImageShape(1, 256, 320), ImageShape(2, 512, 512), ImageShape(4, 768, 1024))
    assert specs["vae_decoder"].profile_shapes(profile)["latent"] == ((1, 4, 32, 40), (2, 4, 64, 64), (4, 4, 96, 128))
    assert specs["vae_encoder"].profile_shapes(profile)["images"] == (
        (1, 3, 256, 320),
        (2, 3, 512, 512),
        (4, 3, 768, 1024),
    )


def test_dynamic_axes_name_every_symbolic_dim(specs):
    assert specs["unet"].dynamic_axes()["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert specs["vae_decoder"].dynamic_axes()["images"] == {0: "batch", 2: "height", 3: "width"}
    assert specs["text_encoder"].dynamic_axes()["input_ids"] == {0: "batch"}
    assert specs["unet"].dynamic_axes()["encoder_hidden_states"] == {0: "batch", 1: "context_tokens"}


def test_output_shapes_follow_the_inputs(specs):
    assert specs["vae_decoder"].output_shapes({"latent": (3, 4, 5, 7)}) == {"images": (3, 3, 40, 56)}
    assert specs["vae_encoder"].output_shapes({"images": (2, 3, 40, 56)}) == {
        "latent": (2, 4, 5, 7),
        "latent_logvar": (2, 4, 5, 7),
    }
    assert specs["unet"].output_shapes(
        {"sample": (2, 9, 5, 7), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    ) == {"out_sample": (2, 4, 5, 7)}
    long = {"sample": (2, 9, 5, 7), "timestep": (2,), "encoder_hidden_states": (2, 4 * 77, 768)}
    assert specs["unet"].output_shapes(long) == {"out_sample": (2, 4, 5, 7)}
    assert specs["unet"].context_chunks(4 * 77) == 4


def test_a_context_that_is_not_whole_chunks_is_refused(specs):
    unet = specs["unet"]
    for tokens in (76, 100, 155, 0):
        shapes = {"sample": (2, 9, 5, 7), "timestep": (2,), "encoder_hidden_states": (2, tokens, 768)}
        with pytest.raises(ValueError, match=f"has {tokens} context tokens, which is not a multiple of 77"):
            unet.bind(shapes)
    with pytest.raises(ValueError, match="vae_decoder: no input has a context-token axis"):
        specs["vae_decoder"].context_chunks(77)


def test_bind_reports_bad_shapes(specs):
    unet = specs["unet"]
    with pytest.raises(ValueError, match="'sample' must have 4 dims"):
        unet.bind({"sample": (2, 9, 5), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)})
    with pytest.raises(ValueError, match="dim batch is 3 but another input says 2"):
        unet.bind({"sample": (2, 9, 5, 7), "timestep": (3,), "encoder_hidden_states": (2, 77, 768)})
    with pytest.raises(ValueError, match=r"expected \[batch, context_tokens, 768\]"):
        unet.bind({"sample": (2, 9, 5, 7), "timestep": (2,), "encoder_hidden_states": (2, 77, 1024)})
    with pytest.raises(ValueError, match="missing input 'timestep'"):
        unet.bind({"sample": (2, 9, 5, 7), "encoder_hidden_states": (2, 77, 768)})


def test_sample_inputs_have_the_right_shapes_dtypes_and_are_not_zero(specs):
    sample, timestep, context = specs["unet"].sample_inputs(ImageShape(2, 64, 48), dtype=torch.float16)
    assert sample.shape == (4, 9, 8, 6) and sample.dtype == torch.float16
    assert sample.abs().sum() > 0 and context.shape == (4, 77, 768)
    assert specs["unet"].sample_inputs(ImageShape(1, 64, 48), chunks=3)[2].shape == (2, 231, 768)
    assert timestep.dtype == torch.float32 and ((timestep > 0) & (timestep < 1000)).all()
    (ids,) = specs["text_encoder"].sample_inputs(ImageShape(1, 64, 64))
    assert ids.dtype == torch.int64 and ids.shape == (2, 77) and ids.max() < 49408 and ids.unique().numel() > 10


def test_spec_round_trips_through_json(specs):
    for spec in specs.values():
        assert NetworkSpec.from_dict(spec.to_dict()) == spec
    assert NetworkSpec.from_dict(specs["unet"].to_dict()).chunk_tokens == 77
    old = {key: value for key, value in specs["vae_decoder"].to_dict().items() if key != "chunk_tokens"}
    assert NetworkSpec.from_dict(old) == specs["vae_decoder"]  # manifests written before the context axis
    with pytest.raises(ValueError, match="malformed network spec"):
        NetworkSpec.from_dict({"name": "unet"})
