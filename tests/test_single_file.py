"""The original-layout (CompVis) <-> diffusers key map, detection and config inference.

The map is checked against an independent implementation (diffusers' own single-file converters),
against real SD 1.5 key names, and at the full SD 1.5 / 2.1 sizes with shape-only meta tensors.
"""

import pytest
import torch

from runtime import single_file
from runtime.default_configs import default_configs
from runtime.single_file import OriginalTensor, detect_layout, infer_configs, to_original_layout
from tests.model_factory import (
    KINDS,
    build_reference_models,
    full_size_meta_models,
    single_file_state_dict,
    small_configs,
)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


def _assert_same_tensors(converted: dict, reference: dict, what: str):
    assert set(converted) == set(reference), f"{what}: key sets differ: {sorted(set(converted) ^ set(reference))[:5]}"
    different = [k for k in reference if not torch.equal(converted[k], reference[k])]
    assert not different, f"{what}: tensors differ for {different[:5]}"


def test_original_layout_matches_diffusers_converters(kind):
    """Our diffusers -> original map, undone by diffusers' original -> diffusers converters, is the identity."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    models = build_reference_models(kind)
    original = single_file_state_dict(kind)
    configs = small_configs(kind)
    _assert_same_tensors(convert_ldm_unet_checkpoint(original, configs["unet"]), models["unet"].state_dict(), "unet")
    _assert_same_tensors(convert_ldm_vae_checkpoint(original, configs["vae"]), models["vae"].state_dict(), "vae")
    if kind == "sd1":
        text = convert_ldm_clip_checkpoint(original)
    else:
        text = convert_open_clip_checkpoint(models["text_encoder"], original)
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    reference = models["text_encoder"].state_dict()
    # diffusers drops OpenCLIP's unused last block only under its full-size name (resblocks.23).
    text = {k: v for k, v in text.items() if k in reference}
    _assert_same_tensors(text, reference, "text encoder")


def test_original_layout_prefixes_and_vae_conv_attention(kind):
    original = single_file_state_dict(kind)
    text_prefix = "cond_stage_model.transformer.text_model." if kind == "sd1" else "cond_stage_model.model."
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", text_prefix)) for k in original)
    # LDM's VAE attention is made of 1x1 convs.
    assert original["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert original["first_stage_model.decoder.mid.attn_1.norm.weight"].ndim == 1
    if kind == "sd2":
        layers = small_configs(kind)["text_encoder"]["num_hidden_layers"]
        fused = original[f"{text_prefix}transformer.resblocks.0.attn.in_proj_weight"]
        assert fused.shape == (3 * 64, 64)
        # OpenCLIP's last block (never run by SD 2.x) is present, as in real SD 2.x files.
        assert f"{text_prefix}transformer.resblocks.{layers}.ln_1.weight" in original


def test_full_size_detection_and_config_inference(kind):
    """At real SD 1.5 / 2.1 sizes: kind detected and every inferable config field recovered."""
    models = full_size_meta_models(kind)
    original = to_original_layout(**{n: m.state_dict() for n, m in models.items()}, kind=kind)
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    layout = detect_layout(shapes)
    assert layout.kind == kind
    assert infer_configs(shapes, layout) == default_configs(kind)
    if kind == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in shapes  # 24 OpenCLIP blocks
        assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)


def test_real_sd15_key_names():
    """Spot checks against key names of the published SD 1.5 checkpoint."""
    models = full_size_meta_models("sd1")
    original = set(to_original_layout(**{n: m.state_dict() for n, m in models.items()}, kind="sd1"))
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.9.0.op.bias",
        "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.bias",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "first_stage_model.encoder.norm_out.bias",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in original, key
    assert "model.diffusion_model.output_blocks.11.2.conv.weight" not in original  # no upsampler at the top


def test_detect_layout_without_text_encoder_uses_context_width():
    def shapes(width):
        return {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, width)}

    assert detect_layout(shapes(768)) == single_file.Layout("sd1", None)
    assert detect_layout(shapes(1024)) == single_file.Layout("sd2", None)
    with pytest.raises(ValueError, match="512"):
        detect_layout(shapes(512), "x.safetensors")


def test_detect_layout_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="SDXL"):
        detect_layout({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)})
    with pytest.raises(ValueError, match=r"foo\.safetensors.*not a Stable Diffusion.*lm_head\.weight"):
        detect_layout({"lm_head.weight": (10, 10)}, "foo.safetensors")


def test_infer_configs_names_missing_tensor():
    shapes = {k: tuple(v.shape) for k, v in single_file_state_dict("sd1").items()}
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(ValueError, match=r"ckpt\.safetensors.*model\.diffusion_model\.out\.2\.weight"):
        infer_configs(shapes, detect_layout(shapes), "ckpt.safetensors")


def test_original_tensor_conversions():
    fused = torch.randn(12, 4)
    assert torch.equal(OriginalTensor("w", "qkv", 1).convert(fused), fused[4:8])
    assert OriginalTensor("w", "qkv", 2).converted_shape((12, 4)) == (4, 4)
    conv = torch.randn(5, 5, 1, 1)
    assert torch.equal(OriginalTensor("w", "to_linear").convert(conv), conv[:, :, 0, 0])
    assert OriginalTensor("w", "to_linear").converted_shape((5, 5)) == (5, 5)
    assert OriginalTensor("w").converted_shape((5, 5, 1, 1)) == (5, 5, 1, 1)


def test_unknown_keys_have_no_original_name():
    # (add_embedding, SDXL's, has one since SDXL single files load: label_emb.0.0.)
    with pytest.raises(KeyError, match="class_embedding"):
        single_file.unet_key_map(["class_embedding.linear_1.weight"])
    with pytest.raises(ValueError, match="kind"):
        to_original_layout(unet={}, vae={}, text_encoder={}, kind="sdxl")
