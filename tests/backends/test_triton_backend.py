"""The `triton` backend: our kernels swapped into the UNet and VAE by module substitution.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py), at the tiny preset's
shapes; the GPU test runs the full SD 1.5 UNet.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from runtime.backends.triton_backend import prepare_triton
from runtime.backends.triton_layers import TritonAttentionCore, TritonGroupNorm
from runtime.bench.presets import perturb_, preset_configs
from runtime.models.layers import AttentionCore, GroupNorm
from runtime.models.unet import UNet, UNetConfig
from runtime.models.vae import AutoencoderKL, VAEConfig
from tests import seeding

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The kernels run on the GPU where there is one (the interpreter is off there), else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _models(preset: str = "tiny"):
    configs = preset_configs(preset)
    with seeding.global_rng(0):
        unet = UNet(UNetConfig.from_dict(configs["unet"])).eval()
        vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"])).eval()
    generator = torch.Generator().manual_seed(1)
    perturb_(unet, generator)
    perturb_(vae, generator)
    return unet, vae


def _on_triton(unet, vae, dtype, device=DEVICE):
    components = SimpleNamespace(unet=copy.deepcopy(unet).to(device, dtype), vae=copy.deepcopy(vae).to(device, dtype))
    return prepare_triton(components)


def _max_error(value, reference):
    return (value.float().cpu() - reference.float().cpu()).abs().max().item()


def test_every_groupnorm_and_attention_is_swapped_and_weights_are_kept():
    unet, vae = _models()
    triton = _on_triton(unet, vae, torch.float32)
    for ours, original in ((triton.unet, unet), (triton.vae, vae)):
        kinds = {type(m) for m in ours.modules()}
        assert GroupNorm not in kinds and AttentionCore not in kinds
        assert TritonGroupNorm in kinds and TritonAttentionCore in kinds
        swapped, kept = ours.state_dict(), original.state_dict()
        assert swapped.keys() == kept.keys()
        assert all(torch.equal(swapped[k].cpu(), kept[k]) for k in kept)
    assert triton.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "dtype, atol",
    [
        (torch.float32, 1e-5),  # GroupNorm kernel; fp32 attention stays on SDPA (the kernel is fp16/bf16)
        (torch.float16, 2e-3),  # both kernels
    ],
)
def test_unet_on_triton_matches_the_fp32_reference_like_torch_does(dtype, atol):
    unet, vae = _models()
    triton = _on_triton(unet, vae, dtype)
    torch_same_dtype = copy.deepcopy(unet).to(DEVICE, dtype)
    sample = torch.randn(2, 4, 8, 6)  # odd latent aspect: 48x64 px
    context = torch.randn(2, 77, 64)
    with torch.inference_mode():
        reference = unet(sample, 321, context)
        ours = triton.unet(sample.to(DEVICE, dtype), 321, context.to(DEVICE, dtype))
        theirs = torch_same_dtype(sample.to(DEVICE, dtype), 321, context.to(DEVICE, dtype))
    assert torch.isfinite(ours).all()
    assert _max_error(ours, reference) <= 2 * _max_error(theirs, reference) + atol


def test_vae_decode_on_triton_matches_the_reference_in_fp16():
    unet, vae = _models()
    triton = _on_triton(unet, vae, torch.float16)
    latents = torch.randn(1, 4, 6, 5)
    with torch.inference_mode():
        reference = vae.decode(latents)
        ours = triton.vae.decode(latents.to(DEVICE, torch.float16))
        theirs = copy.deepcopy(vae).to(DEVICE, torch.float16).decode(latents.to(DEVICE, torch.float16))
    assert ours.shape == (1, 3, 48, 40)
    assert _max_error(ours, reference) <= 2 * _max_error(theirs, reference) + 2e-3


def test_unet_on_triton_with_context_kv_equals_without():
    """The attention kernel reads each cross-attention's K and V as strided column slices of the one
    projection (token stride: the whole stack's width), beside fused_qkv's self-attention views."""
    unet, vae = _models()
    triton = _on_triton(unet, vae, torch.float16)
    sample = torch.randn(2, 4, 8, 6).to(DEVICE, torch.float16)
    context = torch.randn(2, 77, 64).to(DEVICE, torch.float16)
    with torch.inference_mode():
        plain = triton.unet(sample, 321, context)
        projected = triton.unet(sample, 321, context, context_kv=triton.unet.project_context(context))
    assert torch.isfinite(plain).all()
    # Bit-identical on the CPU (the stacked GEMM rounds as the separate ones); a GPU's GEMMs may block
    # the stacked one otherwise: fp16 rounding of the K/V, far below the tolerance against fp32 above.
    assert _max_error(projected, plain) <= (0 if DEVICE == "cpu" else 2e-3)


@pytest.mark.parametrize(
    "dtype, head_dim", [(torch.float16, 320), (torch.float32, 40)], ids=["head-dim-past-the-kernel", "fp32"]
)
def test_attention_falls_back_to_sdpa_where_the_kernel_does_not_apply(dtype, head_dim):
    # The VAE's single 512-wide head and fp32 (SD 2.1's upcast attention) go to SDPA, unchanged.
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, head_dim, generator=gen).to(DEVICE, dtype) for n in (33, 77, 77))
    torch.testing.assert_close(TritonAttentionCore()(q, k, v), AttentionCore()(q, k, v), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_full_sd15_unet_on_triton_matches_torch_fp16_on_gpu():
    unet, vae = _models("sd15")
    triton = _on_triton(unet, vae, torch.float16, device="cuda")
    torch_fp16 = copy.deepcopy(unet).to("cuda", torch.float16)
    reference = unet.to("cuda")
    sample = torch.randn(2, 4, 64, 64, device="cuda")
    context = torch.randn(2, 77, 768, device="cuda")
    with torch.inference_mode():
        expected = reference(sample, 500, context)
        ours = triton.unet(sample.half(), 500, context.half())
        theirs = torch_fp16(sample.half(), 500, context.half())
    assert _max_error(ours, expected) <= 2 * _max_error(theirs, expected) + 1e-2


def test_upcast_attention_runs_on_the_kernel_and_matches_fp32(monkeypatch):
    """SD 2.1's upcast_attention: the reference core computes in fp32; the kernel core keeps fp16
    inputs (its scores and softmax are fp32 already) instead of falling back to SDPA."""
    import kernels.attention

    calls = []
    real_attention = kernels.attention.attention
    monkeypatch.setattr(kernels.attention, "attention", lambda *a: calls.append(1) or real_attention(*a))
    q, k, v = (torch.randn(1, 5, 40, 64, device=DEVICE) for _ in range(3))
    reference = AttentionCore(upcast=True)(q, k, v)
    ours = TritonAttentionCore(upcast=True)(q.half(), k.half(), v.half())
    theirs = AttentionCore(upcast=True)(q.half(), k.half(), v.half())
    assert calls and ours.dtype == torch.float16
    assert _max_error(ours, reference) <= 2 * _max_error(theirs, reference) + 2e-3


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=str)
@pytest.mark.parametrize("shift_batch", [2, 1], ids=["per-item-shift", "one-shift"])
def test_triton_groupnorm_reads_the_shift_as_the_reference_adds_it(dtype, atol, shift_batch):
    """GroupNorm.forward(x, shift) (the contract in runtime/models/layers.py), the shift now read by the
    kernel: within the rule against fp32 that torch's same-dtype module meets."""
    from runtime.models.substitution import rebind

    gen = torch.Generator().manual_seed(4)
    reference = GroupNorm(32, 320, activation="silu")
    perturb_(reference, gen)
    x = torch.randn(2, 320, 5, 3, generator=gen) * 2 + 1
    shift = torch.randn(shift_batch, 320, generator=gen) * 2
    expected = reference(x, shift)
    same_dtype = copy.deepcopy(reference).to(DEVICE, dtype)
    ours = rebind(copy.deepcopy(same_dtype), TritonGroupNorm)
    x_, shift_ = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last), shift.to(DEVICE, dtype)
    with torch.inference_mode():
        got, theirs = ours(x_, shift_), same_dtype(x_, shift_)
    assert torch.isfinite(got).all()
    assert _max_error(got, expected) <= 2 * _max_error(theirs, expected) + atol
    assert _max_error(got, reference(x)) > 0.1  # the shift was applied
