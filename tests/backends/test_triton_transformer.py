"""The triton backend's transformer block: TritonTransformerBlock (LayerNorm and add+LayerNorm kernels) in
place of BasicTransformerBlock. On the CPU the kernels run under the Triton interpreter (tests/conftest.py).
The whole tiny UNets through it: tests/backends/test_triton_backend.py and test_triton_sdxl.py."""

import collections
import copy
from types import SimpleNamespace

import pytest
import torch

from runtime.backends.fused_qkv import FusedQKVAttention
from runtime.backends.triton_backend import prepare_triton
from runtime.backends.triton_transformer import TritonTransformerBlock, fuse_layer_norms
from runtime.bench.op_census import count_ops
from runtime.bench.presets import perturb_, preset_configs
from runtime.default_configs import sdxl_bench_preset
from runtime.models.blocks import BasicTransformerBlock
from runtime.models.unet import UNet, UNetConfig
from runtime.models.vae import AutoencoderKL, VAEConfig
from tests import seeding
from tests.fake_cuda_graphs import FakeCudaGraphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(dtype, only_cross_attention=False):
    with seeding.global_rng(0):
        block = BasicTransformerBlock(64, 2, 32, 48, only_cross_attention, False).eval()
    perturb_(block, torch.Generator().manual_seed(1))
    return block.to(DEVICE, dtype)


def _inputs(dtype):
    gen = seeding.generator("inputs")
    x = torch.randn(2, 15, 64, generator=gen, dtype=torch.float64) * 2 + 1
    context = torch.randn(2, 7, 48, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype), context.to(DEVICE, dtype)


def _fused(block):
    block.__class__ = TritonTransformerBlock
    return block


def _components(preset):
    configs = sdxl_bench_preset(preset)[0] if preset == "tiny-sdxl" else preset_configs(preset)
    return SimpleNamespace(
        unet=UNet(UNetConfig.from_dict(configs["unet"])).eval(),
        vae=AutoencoderKL(VAEConfig.from_dict(configs["vae"])).eval(),
    )


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_triton_backend_swaps_every_transformer_block_and_keeps_the_state_dict(preset):
    components = _components(preset)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    blocks = sum(type(m) is BasicTransformerBlock for m in components.unet.modules())
    prepare_triton(components)
    kinds = [type(m) for m in components.unet.modules()]
    assert BasicTransformerBlock not in kinds and kinds.count(TritonTransformerBlock) == blocks > 0
    swapped = [m for m in components.unet.modules() if type(m) is TritonTransformerBlock]
    assert all(type(b.attn1) is FusedQKVAttention for b in swapped)  # fuse_qkv ran first and still holds
    after = components.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("only_cross_attention", [False, True])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_fused_block_matches_the_fp64_block_like_torch_does(dtype, atol, only_cross_attention):
    reference = _block(torch.float64, only_cross_attention)
    ours = _fused(_block(dtype, only_cross_attention))
    x, context = _inputs(torch.float64)
    with torch.no_grad():
        expected = reference(x, context)
        error = (ours(x.to(dtype), context.to(dtype)).double() - expected).abs().max().item()
        torch_error = _block(dtype, only_cross_attention)(x.to(dtype), context.to(dtype)).double() - expected
    assert error <= 2 * torch_error.abs().max().item() + atol


def test_float64_and_cpu_outside_the_interpreter_and_hooked_norms_run_the_torch_block(monkeypatch):
    x, context = _inputs(torch.float64)
    with torch.no_grad():
        assert torch.equal(_fused(_block(torch.float64))(x, context), _block(torch.float64)(x, context))
        x32, c32 = x.float().cpu(), context.float().cpu()
        plain = _block(torch.float32).cpu()
        hooked = _fused(_block(torch.float32).cpu())
        seen = []
        hooked.norm2.register_forward_hook(lambda *_: seen.append(1))
        assert torch.equal(hooked(x32, c32), plain(x32, c32)) and seen == [1]
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor the kernel launcher would refuse
        assert torch.equal(_fused(_block(torch.float32).cpu())(x32, c32), plain(x32, c32))


def test_fake_cuda_graph_replay_equals_eager():
    block = _fused(_block(torch.float16))
    x, context = _inputs(torch.float16)
    static_x, static_context = x.clone(), context.clone()
    api = FakeCudaGraphs()
    graph = api.CUDAGraph()
    with torch.inference_mode():
        with api.graph(graph):
            static_out = block(static_x, static_context)
        fresh_x, fresh_context = _inputs(torch.float16)
        fresh_x = fresh_x * 0.5 - 1  # other values in the same static buffers
        static_x.copy_(fresh_x)
        static_context.copy_(fresh_context)
        graph.replay()
        expected = block(fresh_x, fresh_context)
    assert torch.isfinite(expected).all() and torch.equal(static_out, expected)


def test_census_counts_one_launch_per_fused_add_and_norm_and_the_ff_add_in_its_gemm():
    # The transformer fusion alone: prepare_triton also folds the resnets' adds (tests/backends/test_triton_resnet.py).
    def launches(fuse: bool):
        unet = UNet(UNetConfig.from_dict(preset_configs("tiny")["unet"])).eval().to("meta", torch.float16)
        if fuse:
            fuse_layer_norms(unet)
        sample = torch.empty(2, unet.config.in_channels, 8, 8, device="meta", dtype=torch.float16)
        context = torch.empty(2, 77, unet.config.cross_attention_dim, device="meta", dtype=torch.float16)
        counts = collections.Counter()
        for record in count_ops(lambda: unet(sample, 1, context)):
            counts[record.op] += record.launches
        return counts, sum(type(m) is TritonTransformerBlock for m in unet.modules())

    plain, _ = launches(False)
    fused, blocks = launches(True)
    assert blocks > 0 and fused["aten.native_layer_norm"] == 0
    assert fused["sd_kernels.layer_norm"] == blocks and fused["sd_kernels.add_layer_norm"] == 2 * blocks
    assert plain["aten.native_layer_norm"] == 3 * blocks
    # The two adds before LN2 / LN3, and the last one in the ff's output GEMM (runtime/backends/triton_gemm.py).
    assert plain["aten.add"] - fused["aten.add"] == 3 * blocks
    assert fused["sd_kernels.linear_bias_residual"] == blocks


def test_deepcopy_keeps_the_fused_block():
    block = _fused(_block(torch.float32))
    assert type(copy.deepcopy(block)) is TritonTransformerBlock
