"""Fused q/k/v projections (runtime/backends/fused_qkv.py): same outputs, same state dict, one stored weight."""

import copy

import pytest
import torch

from runtime.backends.fused_qkv import FusedQKVAttention, FusedQKVSpatialSelfAttention, fuse_qkv
from runtime.bench.presets import perturb_
from runtime.models.blocks import Attention, BasicTransformerBlock, SpatialSelfAttention
from tests import seeding


def _block(only_cross_attention=False):
    with seeding.global_rng(0):
        block = BasicTransformerBlock(
            dim=64,
            heads=4,
            head_dim=16,
            context_dim=48,
            only_cross_attention=only_cross_attention,
            upcast_attention=False,
        ).eval()
    perturb_(block, torch.Generator().manual_seed(1))
    return block


def _vae_attention():
    with seeding.global_rng(0):
        attention = SpatialSelfAttention(channels=32, groups=8, eps=1e-6).eval()
    perturb_(attention, torch.Generator().manual_seed(1))
    return attention


def _fused_copy(model):
    fused = copy.deepcopy(model)
    fuse_qkv(fused)
    return fused


def _shares_fused_storage(module) -> bool:
    projections = (module.to_q, module.to_k, module.to_v)
    start = module.qkv_weight.data_ptr()
    size = module.qkv_weight[: module.to_q.out_features].numel() * module.qkv_weight.element_size()
    return all(p.weight.data_ptr() == start + i * size for i, p in enumerate(projections))


def test_only_self_attention_is_fused_and_state_dict_is_unchanged():
    block = _block()
    fused = _fused_copy(block)
    assert type(fused.attn1) is FusedQKVAttention
    assert type(fused.attn2) is Attention  # K/V read the text context, q the tokens
    assert fused.state_dict().keys() == block.state_dict().keys()
    for key, value in block.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    assert _shares_fused_storage(fused.attn1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_output_matches_unfused(dtype):
    block = _block().to(dtype)
    fused = _fused_copy(block)
    x = torch.randn(2, 24, 64, dtype=dtype)
    context = torch.randn(2, 7, 48, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, context), block(x, context))


def test_vae_attention_with_biases_matches_unfused():
    attention = _vae_attention()
    fused = _fused_copy(torch.nn.Sequential(attention))[0]  # substitution replaces children of a model
    assert type(fused) is FusedQKVSpatialSelfAttention and fused.qkv_bias is not None
    x = torch.randn(1, 32, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), attention(x))


def test_cross_attention_is_never_fused_and_a_given_context_takes_the_plain_path():
    # only_cross_attention: attn1 reads the context too. A fused module handed a context (never the case
    # in our models) still computes plain attention.
    block = _block(only_cross_attention=True)
    fused = _fused_copy(block)
    assert type(fused.attn1) is Attention and type(fused.attn2) is Attention
    same_width = BasicTransformerBlock(
        dim=48, heads=4, head_dim=12, context_dim=48, only_cross_attention=False, upcast_attention=False
    )
    fused_same_width = _fused_copy(same_width)
    assert type(fused_same_width.attn1) is FusedQKVAttention and type(fused_same_width.attn2) is Attention
    attention = Attention(64, heads=4, head_dim=16).eval()
    fused_attention = FusedQKVAttention.__new__(FusedQKVAttention)
    fused_attention.__dict__ = copy.deepcopy(attention).__dict__
    fused_attention._fuse_projections()
    x, context = torch.randn(1, 9, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(fused_attention(x, context), attention(x, context))


def test_conversion_load_and_deepcopy_keep_one_fused_weight():
    block = _block()
    fused = _fused_copy(block)
    fused.to(torch.float64)
    assert fused.attn1.qkv_weight.dtype == torch.float64 and _shares_fused_storage(fused.attn1)
    # Loading a state dict writes through the views into the fused weight.
    other = _block()
    perturb_(other, torch.Generator().manual_seed(7))
    fused.load_state_dict(other.state_dict())
    x, context = torch.randn(1, 10, 64), torch.randn(1, 3, 48)
    with torch.no_grad():
        expected = other.to(torch.float64)(x.double(), context.double())
        torch.testing.assert_close(fused(x.double(), context.double()), expected)
        duplicate = copy.deepcopy(fused)
        assert _shares_fused_storage(duplicate.attn1)
        torch.testing.assert_close(duplicate(x.double(), context.double()), expected)
