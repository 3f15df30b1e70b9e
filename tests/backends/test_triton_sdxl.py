"""The `triton` backend on an SDXL-shaped UNet (the tiny-sdxl bench preset): 64-wide heads, transformer
depth growing per level, a 192-wide two-encoder context, text_embeds / time_ids added conditioning.
On the CPU the kernels run under the Triton interpreter (tests/conftest.py)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from runtime.backends.triton_backend import prepare_triton
from runtime.bench.presets import perturb_
from runtime.default_configs import sdxl_bench_preset
from runtime.models.unet import UNet, UNetConfig
from runtime.models.vae import AutoencoderKL, VAEConfig
from tests import seeding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _max_error(value, reference):
    return (value.float().cpu() - reference.float().cpu()).abs().max().item()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_sdxl_unet_on_triton_matches_the_fp32_reference_like_torch_does(dtype, atol):
    configs, _ = sdxl_bench_preset("tiny-sdxl")
    with seeding.global_rng(0):
        unet = UNet(UNetConfig.from_dict(configs["unet"])).eval()
        vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"])).eval()
    perturb_(unet, torch.Generator().manual_seed(1))
    triton = prepare_triton(SimpleNamespace(unet=copy.deepcopy(unet).to(DEVICE, dtype), vae=vae))
    torch_same_dtype = copy.deepcopy(unet).to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 6, generator=gen)  # guided batch, odd latent aspect
    context = torch.randn(2, 77, 192, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 128, generator=gen),
        "time_ids": torch.tensor([[64.0, 48, 0, 0, 64, 48], [1024, 1024, 16, 8, 1024, 1024]]),
    }
    on = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    with torch.inference_mode():
        reference = unet(sample, 321, context, **added)
        ours = triton.unet(on(sample), 321, on(context), **{k: on(v) for k, v in added.items()})
        theirs = torch_same_dtype(on(sample), 321, on(context), **{k: on(v) for k, v in added.items()})
    assert torch.isfinite(ours).all()
    assert _max_error(ours, reference) <= 2 * _max_error(theirs, reference) + atol
