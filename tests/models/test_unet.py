"""Parity of our UNet with diffusers' UNet2DConditionModel on perturbed random weights (fp32, CPU)."""

import gc

import pytest
import torch
from diffusers import UNet2DConditionModel

from runtime.models.layers import AttentionCore, GroupNorm
from runtime.models.unet import UNet, UNetConfig
from tests.models.conftest import perturb_, relative_error

TOLERANCE = 1e-5

# SD 1.x shape: 1x1-conv projections, 8 heads everywhere, CrossAttn levels above a plain bottom level.
SD1_SMALL = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
# SD 2.x shape: Linear projections, per-level head COUNTS (head dim 16 everywhere), fp32 attention.
SD2_SMALL = dict(
    SD1_SMALL,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=48,
)
# SD 1.x inpainting: latents + mask + masked-image latents.
INPAINT_SMALL = dict(SD1_SMALL, in_channels=9, layers_per_block=1)
# SDXL shape: plain top level, deeper transformers, pooled-text + size ids added to the time embedding.
SDXL_SMALL = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    cross_attention_dim=40,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
)
# Rarely used knobs we claim to honour, all at once.
KNOBS_SMALL = dict(
    SD1_SMALL,
    layers_per_block=(1, 2, 1),
    only_cross_attention=(True, False, True),  # the mid block ignores it
    cross_attention_dim=(32, 32, 32),
    transformer_layers_per_block=(2, 1, 1),
    mid_block_scale_factor=1.41,
    time_embedding_dim=96,
    center_input_sample=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    conv_in_kernel=1,
    conv_out_kernel=5,
    downsample_padding=0,
    norm_eps=1e-6,
)


def build_pair(config_kwargs: dict, generator: torch.Generator):
    """diffusers' model with perturbed weights, and ours built from its config with the same weights."""
    ref = UNet2DConditionModel(**config_kwargs).eval()
    perturb_(ref, generator)
    ours = UNet(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def random_inputs(config: UNetConfig, generator: torch.Generator, batch: int = 2, size=(8, 8), tokens: int = 7):
    context_dim = config.per_level("cross_attention_dim")[0]
    sample = torch.randn(batch, config.in_channels, *size, generator=generator)
    context = torch.randn(batch, tokens, context_dim, generator=generator)
    timesteps = torch.randint(1, 1000, (batch,), generator=generator)
    return sample, timesteps, context


@pytest.mark.parametrize(
    "name,config_kwargs,size",
    [
        ("sd1", SD1_SMALL, (8, 8)),
        ("sd2", SD2_SMALL, (8, 8)),
        ("inpaint", INPAINT_SMALL, (8, 8)),
        ("sd1_odd_size", SD1_SMALL, (9, 7)),  # not divisible by 4: upsampling follows the skips' sizes
        ("knobs", KNOBS_SMALL, (8, 12)),
    ],
)
def test_matches_diffusers(name, config_kwargs, size, generator):
    ref, ours = build_pair(config_kwargs, generator)
    sample, timesteps, context = random_inputs(ours.config, generator, size=size)
    with torch.no_grad():
        expected = ref(sample, timesteps, context).sample
        actual = ours(sample, timesteps, context)
    error = relative_error(actual, expected)
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} (seed {generator.initial_seed()})"


def test_sdxl_text_time_matches_diffusers(generator):
    ref, ours = build_pair(SDXL_SMALL, generator)
    sample, timesteps, context = random_inputs(ours.config, generator)
    text_embeds = torch.randn(2, 24, generator=generator)
    time_ids = torch.randint(0, 1024, (2, 6), generator=generator).float()
    with torch.no_grad():
        expected = ref(
            sample, timesteps, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}
        ).sample
        actual = ours(sample, timesteps, context, text_embeds=text_embeds, time_ids=time_ids)
    error = relative_error(actual, expected)
    assert error <= TOLERANCE, f"relative error {error:.2e} (seed {generator.initial_seed()})"
    with pytest.raises(ValueError, match="text_embeds"):
        ours(sample, timesteps, context)


def test_timestep_forms(generator):
    """int, 0-d tensor, [1] and [B] tensors of any dtype all give diffusers' result."""
    ref, ours = build_pair(dict(SD1_SMALL, layers_per_block=1), generator)
    sample, _, context = random_inputs(ours.config, generator, batch=3)
    per_sample = torch.randint(1, 1000, (3,), generator=generator)
    t = int(per_sample[0])
    cases = [
        (t, t),
        (torch.tensor(t), torch.tensor(t)),
        (torch.tensor(t, dtype=torch.float16), torch.tensor(t, dtype=torch.float16)),
        (torch.tensor([t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32)),
        (per_sample, per_sample),
        (per_sample.double() + 0.5, per_sample.double() + 0.5),
    ]
    with torch.no_grad():
        for ours_t, ref_t in cases:
            error = relative_error(ours(sample, ours_t, context), ref(sample, ref_t, context).sample)
            assert error <= TOLERANCE, f"timestep {ours_t!r}: relative error {error:.2e}"
        with pytest.raises(ValueError, match="timestep"):
            ours(sample, per_sample[:2], context)


def test_swappable_layers_are_used(generator):
    """Every norm is our GroupNorm (SiLU fused, no separate activation modules) and every attention
    goes through an AttentionCore fed head-split views with diffusers' head count."""
    ours = UNet(UNetConfig.from_dict(SD2_SMALL)).eval()
    assert not any(isinstance(m, (torch.nn.SiLU, torch.nn.GELU)) for m in ours.modules())
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    # Each resnet has two norm+SiLU, plus the output norm; transformer norms have no activation.
    resnets = sum(1 for name, _ in ours.named_modules() if name.split(".")[-2:-1] == ["resnets"])
    assert sum(m.activation == "silu" for m in norms) == 2 * resnets + 1
    seen = []
    cores = [m for m in ours.modules() if isinstance(m, AttentionCore)]
    hooks = [c.register_forward_hook(lambda mod, args, out: seen.append(args)) for c in cores]
    sample, timesteps, context = random_inputs(ours.config, generator)
    with torch.no_grad():
        ours(sample, timesteps, context)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(cores) > 0
    head_counts = {q.shape[1] for q, _, _ in seen}
    assert head_counts == {2, 4}
    assert {q.shape[-1] for q, _, _ in seen} == {16}  # 32 / 2 and 64 / 4
    assert any(not q.is_contiguous() for q, _, _ in seen)  # views, not copies


def test_bad_input_shapes_are_named(generator):
    ours = UNet(UNetConfig.from_dict(dict(SD1_SMALL, layers_per_block=1))).eval()
    sample, timesteps, context = random_inputs(ours.config, generator)
    cases = [
        ((sample[:, :3], timesteps, context), r"sample must be \[B, 4, h, w\], got \(2, 3, 8, 8\)"),
        ((sample, timesteps, context[0]), r"encoder_hidden_states must be \[B=2, tokens, C\]"),
        ((sample, timesteps, context[:1]), r"encoder_hidden_states must be \[B=2, tokens, C\], got \(1, 7, 32\)"),
        (
            (sample, timesteps, torch.randn(2, 7, 40, generator=generator)),
            r"width 40 does not match config field cross_attention_dim \(32\)",
        ),
    ]
    with torch.no_grad():
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                ours(*args)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("class_embed_type", "timestep", "class_embed_type"),
        ("time_cond_proj_dim", 256, "time_cond_proj_dim"),
        ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift"),
        ("addition_embed_type", "text", "addition_embed_type"),
        (
            "down_block_types",
            ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "SimpleCrossAttnDownBlock2D",
        ),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
        ("act_fn", "gelu", "act_fn"),
        ("norm_num_groups", None, "norm_num_groups"),
        ("attention_head_dim", [3, 4, 4], "attention_head_dim"),
        ("layers_per_block", [1, 2], "layers_per_block"),
        ("transformer_layers_per_block", [[1, 1], [2, 2], [1, 1]], "transformer_layers_per_block"),
        ("some_future_option", True, "some_future_option"),
        ("_class_name", "AutoencoderKL", "_class_name"),
    ],
)
def test_unsupported_config_is_rejected_clearly(field, value, message):
    raw = dict(SD1_SMALL, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0")
    raw[field] = value
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict(raw)


def test_bookkeeping_and_inert_keys_are_accepted():
    raw = dict(
        SD1_SMALL,
        _class_name="UNet2DConditionModel",
        _diffusers_version="0.6.0",
        _name_or_path="/somewhere",
        dropout=0.1,
        class_embed_type=None,
        num_attention_heads=None,
        dual_cross_attention=False,
    )
    config = UNetConfig.from_dict(raw)
    assert config.block_out_channels == (32, 64, 64)
    assert config.heads_per_level == (8, 8, 8)


SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_PARAMETERS = 859_520_964


@pytest.mark.slow
def test_full_sd15_unet_matches_diffusers(generator):
    """The real SD 1.5 architecture: parameter count and one forward at an 8x8 latent."""
    ref = UNet2DConditionModel(**{k: v for k, v in SD15_CONFIG.items() if not k.startswith("_")}).eval()
    perturb_(ref, generator)
    # Built on meta and loaded with assign=True, ours shares ref's tensors: no second 3.4 GB copy.
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_dict(SD15_CONFIG)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    try:
        assert sum(p.numel() for p in ours.parameters()) == SD15_PARAMETERS
        assert sum(p.numel() for p in ref.parameters()) == SD15_PARAMETERS
        sample = torch.randn(2, 4, 8, 8, generator=generator)
        context = torch.randn(2, 77, 768, generator=generator)
        timesteps = torch.tensor([981, 1])
        with torch.no_grad():
            expected = ref(sample, timesteps, context).sample
            actual = ours(sample, timesteps, context)
        error = relative_error(actual, expected)
        assert error <= TOLERANCE, f"relative error {error:.2e} (seed {generator.initial_seed()})"
    finally:
        del ref, ours
        gc.collect()
