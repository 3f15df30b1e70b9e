"""The triton backend's fused-epilogue GEMMs (runtime/backends/triton_gemm.py): the GEGLU projection, the
ff output + residual and Transformer2D's proj_out + residual, each one kernels.fused_linear launch.
On the CPU the kernels run under the Triton interpreter (tests/conftest.py). The whole tiny UNets through
prepare_triton: tests/backends/test_triton_backend.py and test_triton_sdxl.py."""

import collections
import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kernels import fused_linear
from runtime.backends.triton_backend import prepare_triton
from runtime.backends.triton_gemm import TritonTransformer2D, fuse_output_gemms
from runtime.backends.triton_layers import TritonGEGLU
from runtime.backends.triton_resnet import substitute_resnets
from runtime.backends.triton_transformer import fuse_layer_norms
from runtime.bench.presets import perturb_, preset_configs
from runtime.default_configs import sdxl_bench_preset
from runtime.lora import LoraSet
from runtime.models.blocks import GEGLU, Transformer2DModel
from runtime.models.substitution import rebind, replace_modules
from runtime.models.unet import UNet, UNetConfig
from runtime.models.vae import AutoencoderKL, VAEConfig
from tests import seeding
from tests.fake_cuda_graphs import FakeCudaGraphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


def _transformer(dtype, linear: bool):
    with seeding.global_rng(0):
        model = Transformer2DModel(2, 64, 1, 48, 8, linear, False, False).eval()
    perturb_(model, torch.Generator().manual_seed(1))
    return model.to(DEVICE, dtype)


def _fused(model):
    """This file's substitutes alone (no LayerNorm / GroupNorm / attention kernels besides the block's)."""
    fuse_layer_norms(model)
    replace_modules(model, lambda m: type(m) is GEGLU, lambda old: rebind(old, TritonGEGLU))
    fuse_output_gemms(model)
    substitute_resnets(model)  # the 1x1 proj_in / proj_out as GEMMs, as prepare_triton runs them
    # replace_modules swaps children; a bare Transformer2DModel under test is the root.
    return rebind(model, TritonTransformer2D) if type(model) is Transformer2DModel else model


def _inputs(dtype):
    gen = seeding.generator("inputs")
    x = torch.randn(2, 64, 4, 5, generator=gen, dtype=torch.float64) * 2 + 1  # 20 tokens, odd aspect
    context = torch.randn(2, 7, 48, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last), context.to(DEVICE, dtype)


def _counting(monkeypatch):
    calls = collections.Counter()
    for name in ("linear_geglu", "linear_bias_residual"):
        original = getattr(fused_linear, name)

        def spy(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(fused_linear, name, spy)
    return calls


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_triton_backend_swaps_every_transformer2d_and_keeps_the_state_dict(preset):
    configs = sdxl_bench_preset(preset)[0] if preset == "tiny-sdxl" else preset_configs(preset)
    components = SimpleNamespace(
        unet=UNet(UNetConfig.from_dict(configs["unet"])).eval(),
        vae=AutoencoderKL(VAEConfig.from_dict(configs["vae"])).eval(),
    )
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    count = sum(type(m) is Transformer2DModel for m in components.unet.modules())
    prepare_triton(components)
    kinds = [type(m) for m in components.unet.modules()]
    assert Transformer2DModel not in kinds and kinds.count(TritonTransformer2D) == count > 0
    after = components.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("linear", [True, False], ids=["linear_proj", "conv_proj"])
@pytest.mark.parametrize("dtype, atol", TOLERANCES)
def test_fused_transformer2d_matches_the_fp64_one_like_torch_does(dtype, atol, linear, monkeypatch):
    calls = _counting(monkeypatch)
    reference = _transformer(torch.float64, linear)
    ours = _fused(_transformer(dtype, linear).to(memory_format=torch.channels_last))
    x, context = _inputs(torch.float64)
    with torch.no_grad():
        expected = reference(x, context)
        out = ours(x.to(dtype), context.to(dtype))
        torch_error = (_transformer(dtype, linear)(x.to(dtype), context.to(dtype)).double() - expected).abs().max()
    # One GEGLU GEMM per block; the ff output GEMM and proj_out each add their residual.
    assert calls == {"linear_geglu": 1, "linear_bias_residual": 2}
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max().item() <= 2 * torch_error.item() + atol


def test_nchw_float64_and_hooked_layers_run_the_module_path(monkeypatch):
    calls = _counting(monkeypatch)
    x, context = _inputs(torch.float32)
    with torch.no_grad():
        plain = _transformer(torch.float32, False)
        # NCHW: proj_out's residual is not the NHWC token matrix.
        nchw = x.contiguous()
        torch.testing.assert_close(_fused(_transformer(torch.float32, False))(nchw, context), plain(nchw, context))
        assert calls["linear_bias_residual"] == 1  # the ff's only; proj_out ran as the module
        x64, c64 = x.double(), context.double()
        assert torch.equal(
            _fused(_transformer(torch.float64, True))(x64, c64), _transformer(torch.float64, True)(x64, c64)
        )
        hooked = _fused(_transformer(torch.float32, True))
        seen = []
        block = hooked.transformer_blocks[0]
        for layer in (block.ff.net[0].proj, block.ff.net[2], hooked.proj_out):
            layer.register_forward_hook(lambda *_: seen.append(1))
        calls.clear()
        torch.testing.assert_close(hooked(x, context), _transformer(torch.float32, True)(x, context))
        assert seen == [1, 1, 1] and not calls


def test_fake_cuda_graph_replay_equals_eager():
    model = _fused(_transformer(torch.float16, True).to(memory_format=torch.channels_last))
    x, context = _inputs(torch.float16)
    static_x, static_context = x.clone(), context.clone()
    api = FakeCudaGraphs()
    graph = api.CUDAGraph()
    with torch.inference_mode():
        with api.graph(graph):
            static_out = model(static_x, static_context)
        fresh_x, fresh_context = _inputs(torch.float16)
        fresh_x = fresh_x * 0.5 - 1  # other values in the same static buffers
        static_x.copy_(fresh_x)
        static_context.copy_(fresh_context)
        graph.replay()
        expected = model(fresh_x, fresh_context)
    assert torch.isfinite(expected).all() and torch.equal(static_out, expected)


def _ff_lora(unet, path, seed):
    """A kohya LoRA on every feed-forward's GEGLU projection and output linear, and on proj_out."""
    tensors, gen = {}, torch.Generator().manual_seed(seed)
    for key, weight in unet.state_dict().items():
        if key.endswith(("ff.net.0.proj.weight", "ff.net.2.weight", "proj_out.weight")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[name + ".lora_down.weight"] = 0.3 * torch.randn((2, *weight.shape[1:]), generator=gen)
            tensors[name + ".lora_up.weight"] = 0.3 * torch.randn(
                (weight.shape[0], 2) + (1, 1) * (weight.ndim == 4), generator=gen
            )
    save_file(tensors, str(path))
    return path


def test_a_lora_on_the_ff_weights_changes_the_fused_path_as_it_changes_torch(tmp_path):
    with seeding.global_rng(0):
        unet = UNet(UNetConfig.from_dict(preset_configs("tiny")["unet"])).eval()
    perturb_(unet, torch.Generator().manual_seed(1))
    unet = unet.to(DEVICE)
    fused = _fused(copy.deepcopy(unet)).to(memory_format=torch.channels_last)
    sample = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    context = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    lora = _ff_lora(unet, tmp_path / "ff.safetensors", seed=4)
    with torch.inference_mode():
        base = fused(sample, 321, context)
        for model in (unet, fused):
            LoraSet({"unet": model}).load(lora, scale=1.0)
        ours, theirs = fused(sample, 321, context), unet(sample, 321, context)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must reach the fused GEMMs"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
