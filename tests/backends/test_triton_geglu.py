"""The triton backend's feed-forward: TritonGEGLU (kernels.geglu after the projection) in place of GEGLU."""

from types import SimpleNamespace

import pytest
import torch

from runtime.backends.fused_qkv import FusedQKVAttention
from runtime.backends.triton_backend import prepare_triton
from runtime.backends.triton_layers import TritonGEGLU
from runtime.bench.presets import perturb_, preset_configs
from runtime.models.blocks import GEGLU, Attention
from runtime.models.unet import UNet, UNetConfig
from runtime.models.vae import AutoencoderKL, VAEConfig
from tests import seeding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _geglu(dtype):
    with seeding.global_rng(0):
        layer = GEGLU(64, 96).eval()
    perturb_(layer, torch.Generator().manual_seed(1))
    return layer.to(DEVICE, dtype)


def test_triton_backend_swaps_every_geglu_and_fuses_every_self_attention():
    configs = preset_configs("tiny")
    components = SimpleNamespace(
        unet=UNet(UNetConfig.from_dict(configs["unet"])).eval(),
        vae=AutoencoderKL(VAEConfig.from_dict(configs["vae"])).eval(),
    )
    keys = components.unet.state_dict().keys()
    prepare_triton(components)
    kinds = [type(m) for m in components.unet.modules()]
    assert GEGLU not in kinds and kinds.count(TritonGEGLU) > 0
    blocks = [m for m in components.unet.modules() if hasattr(m, "attn1")]
    assert blocks and all(type(b.attn1) is FusedQKVAttention and type(b.attn2) is Attention for b in blocks)
    assert components.unet.state_dict().keys() == keys


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_triton_geglu_matches_geglu_like_torch_does(dtype, atol):
    reference = _geglu(torch.float64)
    ours = _geglu(dtype)
    ours.__class__ = TritonGEGLU
    x = torch.randn(2, 11, 64, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        expected = reference(x)
        error = (ours(x.to(dtype)).double() - expected).abs().max().item()
        torch_error = (_geglu(dtype)(x.to(dtype)).double() - expected).abs().max().item()
    assert error <= 2 * torch_error + atol


def test_float64_falls_back_to_torch():
    layer = _geglu(torch.float64)
    fused = _geglu(torch.float64)
    fused.__class__ = TritonGEGLU
    x = torch.randn(3, 64, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fused(x), layer(x))
