"""The triton backend's resnets and 1x1 convolutions (runtime/backends/triton_resnet.py, pointwise_conv.py):
the same numbers as the torch modules they replace, fewer launches on the census's meta tensors, in-place
edits of the folded biases reaching the one time GEMM, and the fake CUDA-graph path (tests/fake_cuda_graphs.py)
replaying a prepared model bit for bit, a LoRA on the resnets included. On the CPU the kernels run under
the Triton interpreter (tests/conftest.py)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import runtime
from runtime.backends.pointwise_conv import PointwiseConv2d
from runtime.backends.triton_backend import prepare_triton
from runtime.backends.triton_layers import TritonGroupNorm
from runtime.backends.triton_resnet import TritonResnetBlock2D, TritonTimeProjection, substitute_resnets
from runtime.bench.op_census import count_ops
from runtime.bench.presets import write_random_model
from runtime.models.blocks import ResnetBlock2D
from runtime.models.layers import GroupNorm
from runtime.models.substitution import rebind, replace_modules
from runtime.models.time_projection import time_resnets
from runtime.pipeline import Pipeline
from tests.fake_cuda_graphs import FakeCudaGraphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # biases far from zero, so a dropped or doubled bias shows
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.2))
    return module.eval()


def _on_triton(module: nn.Module) -> nn.Module:
    ours = copy.deepcopy(module)
    replace_modules(ours, lambda m: type(m) is GroupNorm, lambda old: rebind(old, TritonGroupNorm))
    wrapper = nn.ModuleDict({"m": ours})
    substitute_resnets(wrapper)
    return wrapper["m"].to(memory_format=torch.channels_last)


# ---------------------------------------------------------------- 1x1 convolutions


def test_pointwise_conv_on_channels_last_is_a_gemm_with_the_bias_inside():
    conv = _randomised(nn.Conv2d(48, 32, kernel_size=1), 0)
    ours = rebind(conv, PointwiseConv2d)
    x = torch.randn(2, 48, 5, 3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = ours(x)
        torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    meta = torch.empty(2, 48, 64, 64, device="meta", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    on_meta = copy.deepcopy(ours).to("meta", torch.float16)
    assert [r.op for r in count_ops(lambda: on_meta(meta))] == ["aten.addmm"]  # no conv, no bias pass


def test_pointwise_conv_falls_back_to_the_exact_conv_for_other_layouts():
    conv = _randomised(nn.Conv2d(8, 4, kernel_size=1), 1)
    ours = rebind(conv, PointwiseConv2d)
    for x in (torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 6)[..., ::2], torch.randn(8, 4, 4)):
        with torch.inference_mode():
            assert torch.equal(ours(x), conv(x))


def test_only_plain_pointwise_convs_are_substituted():
    model = nn.ModuleDict(
        {
            "pointwise": nn.Conv2d(4, 4, 1),
            "strided": nn.Conv2d(4, 4, 1, stride=2),
            "grouped": nn.Conv2d(4, 4, 1, groups=2),
            "three": nn.Conv2d(4, 4, 3, padding=1),
        }
    )
    substitute_resnets(model)
    assert {name: type(m) is PointwiseConv2d for name, m in model.items()} == {
        "pointwise": True,
        "strided": False,
        "grouped": False,
        "three": False,
    }


# ---------------------------------------------------------------- resnets


@pytest.mark.parametrize(
    "in_channels, out_channels, temb_channels, scale",
    [
        (32, 64, 24, 1.0),  # a UNet resnet with a 1x1 shortcut
        (64, 64, 24, 2.0),  # identity shortcut, mid_block_scale_factor 2
        (32, 32, None, 1.0),  # a VAE resnet: no time embedding, shift = conv1.bias
    ],
)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_triton_resnet_matches_the_torch_resnet(in_channels, out_channels, temb_channels, scale, channels_last):
    resnet = _randomised(ResnetBlock2D(in_channels, out_channels, temb_channels, 8, 1e-5, scale), 2)
    ours = _on_triton(resnet)
    assert type(ours) is TritonResnetBlock2D and ours.state_dict().keys() == resnet.state_dict().keys()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, in_channels, 6, 5).contiguous(memory_format=layout)
    temb = torch.randn(2, temb_channels) if temb_channels else None
    with torch.inference_mode():
        expected = resnet(x, temb)
        got = ours.to(DEVICE)(x.to(DEVICE), temb.to(DEVICE) if temb is not None else None)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=1e-5)


def _tiny_unet():
    from runtime.bench.presets import perturb_, preset_configs
    from runtime.models.unet import UNet, UNetConfig

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet(UNetConfig.from_dict(preset_configs("tiny")["unet"])).eval()
    perturb_(unet, torch.Generator().manual_seed(1))
    return unet


def test_the_one_time_gemm_gives_each_resnet_its_conv1_bias_plus_time_projection_and_follows_edits():
    unet = _tiny_unet()
    components = prepare_triton(SimpleNamespace(unet=copy.deepcopy(unet), vae=nn.Module()))
    ours = components.unet
    assert type(ours.time_projection) is TritonTimeProjection
    temb = torch.randn(2, unet.config.time_embed_dim)

    def check():
        projected = ours.time_projection(temb)
        assert projected.includes_conv1_bias
        for r in time_resnets(ours):
            torch.testing.assert_close(projected.for_layer(r), r.norm2_shift(temb), atol=1e-6, rtol=1e-5)

    with torch.inference_mode():
        check()
    stacks = dict(ours.time_projection.stacks)
    with torch.no_grad():  # in place, as load_state_dict does: both folded biases must reach the GEMM
        for r in time_resnets(ours)[1::2]:
            r.conv1.bias.add_(1.0)
            r.time_emb_proj.bias.mul_(-1.0)
    with torch.inference_mode():
        check()
    assert all(ours.time_projection.stacks[k] is v for k, v in stacks.items())  # edited through the views


def test_census_step_drops_the_bias_passes():
    unet = _tiny_unet().to("meta", torch.float16)
    triton = prepare_triton(SimpleNamespace(unet=copy.deepcopy(unet), vae=nn.Module())).unet
    sample = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float16)
    context = torch.empty(2, 77, 64, device="meta", dtype=torch.float16)
    t = torch.tensor(5.0, device="meta")
    ops = [r.op for r in count_ops(lambda: triton(sample, t, context))]
    resnets = len(time_resnets(triton))
    assert ops.count("sd_kernels.bias_residual_add") == resnets
    # conv_in, conv_out and the resampling convs keep their bias pass; no resnet conv or 1x1 conv does.
    resampling = sum(1 for m in triton.modules() if type(m).__name__ in ("Downsample2D", "Upsample2D"))
    assert ops.count("aten.convolution.bias_add") == 2 + resampling
    assert ops.count("aten.silu") == 1 + 1  # the time MLP's own SiLU and silu(temb), once for all resnets


# ---------------------------------------------------------------- fake CUDA graphs


def _resnet_lora(unet, path, seed):
    """A kohya LoRA on every resnet's time_emb_proj and conv_shortcut: the layers this backend folds."""
    tensors, gen = {}, torch.Generator().manual_seed(seed)
    for key, weight in unet.state_dict().items():
        if key.endswith(("time_emb_proj.weight", "conv_shortcut.weight")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[name + ".lora_down.weight"] = 0.3 * torch.randn((2, *weight.shape[1:]), generator=gen)
            tensors[name + ".lora_up.weight"] = 0.3 * torch.randn(
                (weight.shape[0], 2) + (1, 1) * (weight.ndim == 4), generator=gen
            )
    save_file(tensors, str(path))
    return path


def test_fake_graph_replay_of_the_triton_resnets_equals_eager_with_a_lora_and_no_recapture(tmp_path):
    folder = write_random_model("tiny", tmp_path / "model")
    components = runtime.load(folder, backend="torch", device="cpu", dtype="fp32").components
    # This backend's resnet, time-projection and 1x1 substitutes alone, in channels_last as the backend runs
    # them: the interpreted GroupNorm kernel (covered by test_triton_backend.py) would take minutes here.
    substitute_resnets(components.unet)
    components.unet.to(memory_format=torch.channels_last)
    assert any(type(m) is TritonResnetBlock2D for m in components.unet.modules())
    fake = FakeCudaGraphs()
    graphed = Pipeline(components, backend="triton", cuda_graphs=True, graph_api=fake)
    eager = Pipeline(components, backend="triton", cuda_graphs=False)
    run = dict(steps=2, seed=5, guidance=7.5, width=32, height=32, progress=False)
    base = np.asarray(graphed.generate("a cat", **run)[0])
    captures = fake.captures
    graphed.load_lora(_resnet_lora(components.unet, tmp_path / "r.safetensors", seed=3), scale=1.0)
    with_lora = np.asarray(graphed.generate("a cat", **run)[0])
    assert fake.captures == captures, "a LoRA load must not recapture"
    assert not np.array_equal(with_lora, base), "the LoRA must reach the stacked time GEMM and the 1x1 GEMMs"
    assert np.array_equal(with_lora, np.asarray(eager.generate("a cat", **run)[0]))
