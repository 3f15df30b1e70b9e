"""UNet.project_context / forward(context_kv=...): every cross-attention K and V from one GEMM, once per
request (runtime/models/cross_kv.py). Same math as the per-layer projections, so the same output as a
plain forward (and so as diffusers); the stacked weight follows in-place edits and rebuilds itself
wherever a Parameter got storage of its own (fp32, CPU)."""

import copy

import pytest
import torch

from runtime.models.cross_kv import cross_attentions
from tests.models.conftest import relative_error
from tests.models.test_unet import KNOBS_SMALL, SD1_SMALL, SD2_SMALL, SDXL_SMALL, TOLERANCE, build_pair, random_inputs

SD1_SMALLER = dict(SD1_SMALL, layers_per_block=1)  # for the tests that need no parity: half the layers


def _sdxl_inputs(generator):
    return dict(
        text_embeds=torch.randn(2, 24, generator=generator),
        time_ids=torch.randint(0, 1024, (2, 6), generator=generator).float(),
    )


def _stack_shares(unet) -> bool:
    """Whether every cross-attention to_k / to_v weight lives in the UNet's stacked weight."""
    stacked = unet._context_kv_weight
    start, end = stacked.data_ptr(), stacked.data_ptr() + stacked.numel() * stacked.element_size()
    weights = [p.weight for layer in cross_attentions(unet) for p in (layer.to_k, layer.to_v)]
    return all(start <= w.data_ptr() < end for w in weights)


@pytest.mark.parametrize(
    "name, config_kwargs",
    [
        ("sd2", SD2_SMALL),  # per-level head counts: layers of different widths in one stack
        ("knobs", KNOBS_SMALL),  # only_cross_attention: attn1 reads the stack too
        ("sdxl", SDXL_SMALL),  # deeper transformers, added conditioning alongside
    ],
)
def test_forward_with_context_kv_equals_plain_forward_and_diffusers(name, config_kwargs, generator):
    ref, ours = build_pair(config_kwargs, generator)
    sample, timesteps, context = random_inputs(ours.config, generator)
    added = _sdxl_inputs(generator) if name == "sdxl" else {}
    with torch.no_grad():
        plain = ours(sample, timesteps, context, **added)
        context_kv = ours.project_context(context)
        projected = ours(sample, timesteps, context, context_kv=context_kv, **added)
        conditioning = {"added_cond_kwargs": added} if added else {}
        expected = ref(sample, timesteps, context, **conditioning).sample
    layers = cross_attentions(ours)
    assert len(layers) == len([m for m in ref.modules() if type(m).__name__ == "Attention" and m.is_cross_attention])
    width = sum(2 * layer.heads * layer.head_dim for layer in layers)
    assert context_kv.shape == (*context.shape[:2], width)
    # One stacked GEMM rounds as the separate ones on this CPU (measured: 0 of the outputs differ, here and
    # at the SD 1.5 and SDXL widths); the bound allows fp32 rounding in case a BLAS blocks them otherwise.
    error = relative_error(projected, plain)
    assert error <= 1e-6, f"{name}: context_kv changed the output by {error:.2e}"
    assert relative_error(projected, expected) <= TOLERANCE
    for layer in layers:  # each layer's columns hold its own K and V
        start, inner = layer.context_kv_start, layer.heads * layer.head_dim
        with torch.no_grad():
            k, v = layer.to_k(context), layer.to_v(context)
        assert torch.allclose(context_kv[..., start : start + inner], k, rtol=1e-6, atol=1e-6)
        assert torch.allclose(context_kv[..., start + inner : start + 2 * inner], v, rtol=1e-6, atol=1e-6)


def test_the_stack_is_the_weights_and_follows_in_place_edits(generator):
    _, unet = build_pair(SD1_SMALLER, generator)
    sample, timesteps, context = random_inputs(unet.config, generator)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.inference_mode():  # as the pipeline calls it
        unet.project_context(context)
    assert _stack_shares(unet)  # views, not a second copy
    after = unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # A LoRA writes each weight in place, under no_grad and outside inference mode.
    layer = cross_attentions(unet)[-1]
    with torch.no_grad():
        layer.to_v.weight.add_(0.5 * torch.randn(layer.to_v.weight.shape, generator=generator))
        edited = unet.project_context(context)
        start, inner = layer.context_kv_start, layer.heads * layer.head_dim
        assert torch.equal(edited[..., start + inner : start + 2 * inner], layer.to_v(context))
        plain = unet(sample, timesteps, context)
        assert relative_error(unet(sample, timesteps, context, context_kv=edited), plain) <= 1e-6


@pytest.mark.parametrize("how", ["to_dtype", "assign", "deepcopy"])
def test_replaced_parameters_are_stacked_again(how, generator):
    """What gives the Parameters storage of their own must never leave the projection on stale weights."""
    _, unet = build_pair(SD1_SMALLER, generator)
    sample, timesteps, context = random_inputs(unet.config, generator)
    with torch.no_grad():
        unet.project_context(context)
        if how == "to_dtype":
            unet = unet.double()
            sample, context = sample.double(), context.double()
        elif how == "assign":
            state = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in unet.state_dict().items()}
            unet.load_state_dict(state, assign=True)
        else:
            original, unet = unet, copy.deepcopy(unet)
            for p in original.parameters():
                p.zero_()  # the copy must not read the original's stack
        assert how == "assign" or unet._context_kv_weight is None  # the old stack is not kept alive
        projected = unet(sample, timesteps, context, context_kv=unet.project_context(context))
        plain = unet(sample, timesteps, context)
    assert _stack_shares(unet)
    assert relative_error(projected, plain) <= 1e-6


def test_bad_context_kv_and_context_are_named(generator):
    _, unet = build_pair(SD1_SMALLER, generator)
    sample, timesteps, context = random_inputs(unet.config, generator)
    with torch.no_grad():
        context_kv = unet.project_context(context)
        with pytest.raises(ValueError, match=r"context_kv must be project_context\(encoder_hidden_states\)"):
            unet(sample, timesteps, context, context_kv=context_kv[..., :-1])
        with pytest.raises(ValueError, match="context_kv must be"):
            unet(sample, timesteps, context[:, :3], context_kv=context_kv)  # projected from another context
        with pytest.raises(ValueError, match="width 5 does not match config field cross_attention_dim"):
            unet.project_context(torch.randn(2, 7, 5))
        with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, tokens, C\]"):
            unet.project_context(context[0])
        with pytest.raises(ValueError, match="encoder_hidden_states is torch.float64"):
            unet.project_context(context.double())
