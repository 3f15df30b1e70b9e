"""Every resnet's time projection from one GEMM (runtime/models/time_projection.py): the same numbers as
each resnet's own time_emb_proj(silu(temb)), and Parameters that stay views of the stacks, so in-place
edits (a LoRA, load_state_dict) reach the GEMM and conversions / copies stack again."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from runtime.bench.presets import perturb_, preset_configs
from runtime.default_configs import sdxl_bench_preset
from runtime.models.time_projection import TimeProjection, time_resnets
from runtime.models.unet import UNet, UNetConfig
from tests import seeding


def _unet(kind: str = "sd") -> UNet:
    configs = preset_configs("tiny") if kind == "sd" else sdxl_bench_preset("tiny-sdxl")[0]
    with seeding.global_rng(0):
        unet = UNet(UNetConfig.from_dict(configs["unet"])).eval()
    perturb_(unet, torch.Generator().manual_seed(1))
    return unet


def _inputs(kind: str):
    gen = torch.Generator().manual_seed(2)
    sample, context = (
        torch.randn(2, 4, 8, 6, generator=gen),
        torch.randn(2, 77, 64 if kind == "sd" else 192, generator=gen),
    )
    added = {}
    if kind == "sdxl":  # the added embedding (pooled text + size ids) goes into the same temb
        added = {"text_embeds": torch.randn(2, 128, generator=gen), "time_ids": torch.rand(2, 6, generator=gen) * 1024}
    return sample, context, added


def _stack_shares(unet: UNet) -> bool:
    """Every time_emb_proj weight and bias is its row block of the stacks (views, not copies)."""
    stacks, row = unet.time_projection.stacks, 0
    for proj in unet.time_projection.projections:
        rows = proj.out_features
        if proj.weight.data_ptr() != stacks["weight"][row].data_ptr():
            return False
        if proj.bias.data_ptr() != stacks["bias"][row].data_ptr():
            return False
        row += rows
    return row == stacks["weight"].shape[0]


def _separate(unet: UNet, temb: torch.Tensor) -> list[torch.Tensor]:
    return [r.time_emb_proj(F.silu(temb)) for r in time_resnets(unet)]


def _stacked(unet: UNet, temb: torch.Tensor) -> list[torch.Tensor]:
    projected = unet.time_projection(temb)
    return [projected.for_layer(r) for r in time_resnets(unet)]


def _assert_all_close(values, references, **tol):
    assert len(values) == len(references)
    for value, reference in zip(values, references):
        torch.testing.assert_close(value, reference, **tol)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unet_with_one_stacked_projection_equals_the_per_resnet_projections(kind):
    unet = _unet(kind)
    sample, context, added = _inputs(kind)
    with torch.inference_mode():
        stacked = unet(sample, 321, context, **added)
        # Each resnet projecting temb itself: the time projection hands the plain temb on.
        with mock.patch.object(TimeProjection, "forward", lambda self, temb: temb):
            separate = unet(sample, 321, context, **added)
    torch.testing.assert_close(stacked, separate, atol=1e-5, rtol=1e-5)
    temb = torch.randn(2, unet.config.time_embed_dim)
    with torch.inference_mode():
        _assert_all_close(_stacked(unet, temb), _separate(unet, temb), atol=1e-6, rtol=1e-5)


def test_stacks_are_views_so_an_in_place_edit_reaches_the_gemm():
    unet = _unet()
    temb = torch.randn(2, unet.config.time_embed_dim)
    with torch.inference_mode():
        _stacked(unet, temb)
    stack = unet.time_projection.stacks["weight"]
    assert _stack_shares(unet)
    # As a LoRA merge or load_state_dict does: in place, under no_grad, on the resnet's own Parameters.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in time_resnets(unet)[::2]:
            r.time_emb_proj.weight.add_(torch.randn(r.time_emb_proj.weight.shape, generator=gen))
            r.time_emb_proj.bias.mul_(-2.0)
    with torch.inference_mode():
        _assert_all_close(_stacked(unet, temb), _separate(unet, temb), atol=1e-6, rtol=1e-5)
    assert unet.time_projection.stacks["weight"] is stack  # the edit reached the stack: nothing re-stacked
    state = {k: v + 1 for k, v in unet.state_dict().items() if "time_emb_proj" in k}
    unet.load_state_dict(state, strict=False)
    with torch.inference_mode():
        _assert_all_close(_stacked(unet, temb), _separate(unet, temb), atol=1e-6, rtol=1e-5)
    assert unet.time_projection.stacks["weight"] is stack and _stack_shares(unet)


def test_conversion_deepcopy_and_assign_stack_again():
    unet = _unet()
    temb = torch.randn(2, unet.config.time_embed_dim)
    unet.double()
    assert _stack_shares(unet) and unet.time_projection.stacks["weight"].dtype == torch.float64
    with torch.inference_mode():
        _assert_all_close(_stacked(unet, temb.double()), _separate(unet, temb.double()))
    unet.float()
    duplicate = copy.deepcopy(unet)
    assert _stack_shares(duplicate)
    with torch.no_grad():
        time_resnets(duplicate)[0].time_emb_proj.weight.zero_()
    with torch.inference_mode():
        _assert_all_close(_stacked(duplicate, temb), _separate(duplicate, temb), atol=1e-6, rtol=1e-5)
        _assert_all_close(_stacked(unet, temb), _separate(unet, temb), atol=1e-6, rtol=1e-5)
    assert not torch.equal(_stacked(duplicate, temb)[0], _stacked(unet, temb)[0])  # the copy has its own
    fresh = {k: torch.randn_like(v) for k, v in unet.state_dict().items()}
    unet.load_state_dict(fresh, assign=True)  # new Parameters: the old stacks no longer hold them
    with torch.inference_mode():
        _assert_all_close(_stacked(unet, temb), _separate(unet, temb), atol=1e-5, rtol=1e-5)
    assert _stack_shares(unet)


def test_time_projection_adds_no_state_dict_keys():
    unet = _unet()
    assert not any(k.startswith("time_projection") for k in unet.state_dict())
    assert len(time_resnets(unet)) == len(unet.time_projection.projections) > 1
