"""GroupNorm(+SiLU) kernel vs a float64 reference, under the Triton interpreter on CPU (and on CUDA).

Inputs are fresh random tensors with mean 3 and std 2 (a non-zero mean exposes E[x^2]-E[x]^2
cancellation); weights and biases are random, far from the identity init. Outputs are poisoned with NaN
through `out=` before every run, so an element the kernel fails to write cannot pass.
"""

import dataclasses

import pytest
import torch
import triton

import kernels.group_norm as gn
from tests import seeding

group_norm, group_norm_reference = gn.group_norm, gn.group_norm_reference
# Small shapes run on the GPU where there is one (the interpreter is off there), else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol). fp32 is compared directly with the float64 reference. For fp16/bf16 the rule is
# max|kernel - ref64| <= 2 * max|torch same-dtype - ref64| + atol (rtol unused there).
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-3, 0.0),
    torch.bfloat16: (1e-2, 0.0),
}

# (B, C, H, W). Spatial sizes are scaled down from the models' (the interpreter is slow); channel counts
# and group sizes are the real ones, with 32 groups.
INTERPRETER_SHAPES = [
    (2, 320, 8, 8),  # SD1.5/SD2/SDXL first UNet level, Cg = 10 (not a power of two), batch 2 (CFG)
    (1, 640, 4, 4),  # second UNet level, Cg = 20
    (1, 960, 4, 3),  # up-block concat 640+320, Cg = 30, odd width
    (1, 1280, 3, 3),  # deepest SD1.5 level, Cg = 40; 3x3 is odd and smaller than any tile
    (1, 1920, 2, 2),  # SDXL/SD up-block concat 1280+640, Cg = 60
    (1, 2560, 1, 1),  # up-block concat 1280+1280, Cg = 80, 1x1: every group is 80 scalars
    (3, 128, 7, 9),  # VAE last level, Cg = 4, batch 3, 7x9 odd sizes and masking on both axes
    (1, 256, 3, 5),  # VAE, Cg = 8, 3x5 odd
    (2, 512, 16, 16),  # VAE first level, Cg = 16 (a power of two: no masked channel lanes), a 256x16 tile
    (1, 64, 80, 70),  # many spatial tiles per group (5600 > MAX_TILE positions) when split
]
# Every interpreter shape's group fits the one-pass tile (the deepest SD levels, scaled down): the sweep
# runs each through the one-pass kernel (asserted) and again through the looped kernel, which the larger
# real groups take. The split kernels (groups past LOOPED_MAX_GROUP_ELEMENTS) run on SPLIT_SHAPES only:
# one per tiling they take (chunked channels_last at Cg 10 and at the VAE's Cg 4, many tiles per group).
PATHS = ["one_pass", "looped"]
SPLIT_SHAPES = [(2, 320, 8, 8), (3, 128, 7, 9), (1, 64, 80, 70)]


def _random_inputs(shape, dtype, device, channels_last, affine=True, seed=None):
    gen = torch.Generator(device="cpu").manual_seed(
        seed if seed is not None else seeding.derived_seed(shape, str(dtype), channels_last, affine)
    )
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
    weight = (torch.randn(shape[1], generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype) if affine else None
    bias = (torch.randn(shape[1], generator=gen, dtype=torch.float64) * 0.5).to(dtype) if affine else None
    x = x.to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, (weight.to(device) if affine else None), (bias.to(device) if affine else None)


def _poisoned_like(x):
    return torch.full_like(x, float("nan"))  # full_like keeps x's memory format


def _assert_close_to_reference(x, weight, bias, activation, y, eps=1e-5, shift=None):
    as64 = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = group_norm_reference(as64(x), _groups(x), as64(weight), as64(bias), eps, activation, shift=as64(shift))
    err = (y.double() - ref).abs().max().item()
    atol, rtol = TOLERANCES[x.dtype]
    assert torch.isfinite(y).all(), "kernel left unwritten (NaN) or non-finite outputs"
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
        return
    torch_y = group_norm_reference(x, _groups(x), weight, bias, eps, activation, upcast=False, shift=shift)
    torch_err = (torch_y.double() - ref).abs().max().item()
    if x.dtype == torch.bfloat16 and y.device.type == "cpu":
        # Triton's interpreter truncates fp32 -> bf16 on store where a GPU rounds to nearest: there an
        # exact kernel is off by up to one bf16 ulp, twice torch's rounding error.
        torch_err = max(torch_err, (_truncate_to_bf16(ref) - ref).abs().max().item())
    assert err <= 2 * torch_err + atol, f"{x.dtype}: kernel error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


def _truncate_to_bf16(t):
    """fp64 -> bf16 by dropping the low 16 bits of the fp32 value, as the interpreter casts."""
    bits = t.float().view(torch.int32) & -65536  # 0xFFFF0000
    return bits.view(torch.float32).double()


def _groups(x):
    return 32 if x.shape[1] % 32 == 0 else 1


def _run(x, weight, bias, activation, path, shift=None):
    """group_norm through `path`: "one_pass" (the launcher's own choice, asserted to be the one-pass
    kernel), "looped" (what it takes without the one-pass kernel, asserted to be the looped kernel) or
    "split" (the split kernels it would take without either)."""
    out = _poisoned_like(x)
    if path == "one_pass":
        assert isinstance(gn.plan(x, 32, out), gn.OnePassConfig), "the shape should take the one-pass kernel"
        y = group_norm(x, 32, weight, bias, activation=activation, out=out, shift=shift)
        assert y is out
    else:
        config = gn.plan(x, 32, out, allow_one_pass=False, allow_looped=path == "looped")
        assert isinstance(config, gn.LoopedConfig) == (path == "looped")
        assert not isinstance(config, gn.OnePassConfig)
        gn.launch(x, 32, weight, bias, 1e-5, activation, out, config, shift=shift)
    return out


@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference_fp32(shape, channels_last, activation, path):
    x, weight, bias = _random_inputs(shape, torch.float32, DEVICE, channels_last)
    y = _run(x, weight, bias, activation, path)
    _assert_close_to_reference(x, weight, bias, activation, y)


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_split_kernels_match_reference_fp32(shape, channels_last, activation):
    x, weight, bias = _random_inputs(shape, torch.float32, DEVICE, channels_last)
    y = _run(x, weight, bias, activation, "split")
    _assert_close_to_reference(x, weight, bias, activation, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 320, 8, 8), (1, 1280, 3, 3), (3, 128, 7, 9)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("path", PATHS + ["split"])
def test_matches_reference_low_precision(dtype, shape, channels_last, path):
    x, weight, bias = _random_inputs(shape, dtype, DEVICE, channels_last)
    y = _run(x, weight, bias, "silu", path)
    assert y.dtype == dtype
    _assert_close_to_reference(x, weight, bias, "silu", y)


def _shift(kind, batch, channels, dtype, seed):
    """A per-channel shift of mean 1 and std 2 (it moves the group statistics): [B, C], [1, C], or a
    [1, C] expanded to [B, C] (batch stride 0), or a [B, C] view with a channel stride of 2."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "per_item":
        return (torch.randn(batch, channels, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype).to(DEVICE)
    if kind == "strided":
        wide = torch.randn(batch, 2 * channels, generator=gen, dtype=torch.float64) * 2 + 1
        return wide.to(dtype).to(DEVICE)[:, ::2]
    one = (torch.randn(1, channels, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype).to(DEVICE)
    return one if kind == "one" else one.expand(batch, channels)


# The shift through both paths and every layout: real channel counts at the scaled-down sizes above,
# rotating dtype, layout and kind of shift; the resnets' second norm (SiLU, affine) is the user.
SHIFT_CASES = [
    ((2, 320, 8, 8), torch.float32, False, "per_item"),  # Cg 10, guided batch
    ((2, 640, 4, 4), torch.float16, True, "one"),  # Cg 20, one shift for both batch items
    ((2, 1280, 3, 3), torch.bfloat16, True, "broadcast"),  # Cg 40, batch stride 0
    ((1, 1920, 2, 2), torch.float16, False, "strided"),  # Cg 60, channel stride 2
    ((2, 2560, 1, 1), torch.float32, True, "per_item"),  # Cg 80 at 1x1
    ((3, 128, 7, 9), torch.bfloat16, False, "per_item"),  # VAE Cg 4, odd sizes
    ((2, 512, 5, 3), torch.float32, True, "strided"),  # VAE Cg 16 in channels_last chunks when split
]


# The split kernels with a shift: the per-group tiles (NCHW) and the channels_last chunks.
SHIFT_PATHS = [(case, path) for case in SHIFT_CASES for path in PATHS]
SHIFT_PATHS += [(SHIFT_CASES[5], "split"), (SHIFT_CASES[6], "split")]


@pytest.mark.parametrize("case, path", SHIFT_PATHS, ids=str)
def test_shift_is_added_before_the_statistics(case, path):
    shape, dtype, channels_last, kind = case
    x, weight, bias = _random_inputs(shape, dtype, DEVICE, channels_last)
    shift = _shift(kind, shape[0], shape[1], dtype, seed=len(shape) + shape[1])
    y = _run(x, weight, bias, "silu", path, shift=shift)
    _assert_close_to_reference(x, weight, bias, "silu", y, shift=shift)
    # The shift changed the statistics (not a no-op): a plain GroupNorm of x is far off.
    assert (
        y.double() - group_norm_reference(x.double(), 32, weight.double(), bias.double(), activation="silu")
    ).abs().max() > 0.1


# SD 1.5's one-pass GroupNorms at full size (guided batch 2, fp16, channels_last as the triton backend
# runs them), with the resnets' shift: the tiles at ONE_PASS_MAX_LANES, as the GPU runs them.
@pytest.mark.parametrize(
    "shape",
    [
        (2, 1280, 16, 16),  # level 2: Cg 40 x 256 positions = 10240 elements in a 16384-lane tile
        (2, 1920, 16, 16),  # level 2 up-block concat: Cg 60, 15360 of 16384 lanes
        (2, 2560, 8, 8),  # level 3 up-block concat: Cg 80 x 64
    ],
    ids=str,
)
def test_one_pass_at_sd15_full_size(shape):
    x, weight, bias = _random_inputs(shape, torch.float16, DEVICE, channels_last=True)
    shift = _shift("per_item", shape[0], shape[1], torch.float16, seed=3)
    y = _run(x, weight, bias, "silu", "one_pass", shift=shift)
    _assert_close_to_reference(x, weight, bias, "silu", y, shift=shift)


# Full-size real groups through the looped kernel (batch 1: the interpreter is slow), fp16 with the
# resnets' shift: SD 1.5's first level in NCHW (10 tiles of 4096 positions, one channel each) and its
# second level in channels_last (4 tiles of 256 positions x 32 channel lanes).
@pytest.mark.parametrize("shape, channels_last", [((1, 320, 64, 64), False), ((1, 640, 32, 32), True)], ids=str)
def test_looped_at_sd15_full_size(shape, channels_last):
    x, weight, bias = _random_inputs(shape, torch.float16, DEVICE, channels_last=channels_last)
    config = gn.plan(x, 32, x)
    assert isinstance(config, gn.LoopedConfig) and config.num_tiles > 1
    shift = _shift("per_item", shape[0], shape[1], torch.float16, seed=5)
    out = _poisoned_like(x)
    group_norm(x, 32, weight, bias, activation="silu", out=out, shift=shift)
    _assert_close_to_reference(x, weight, bias, "silu", out, shift=shift)


@pytest.mark.parametrize(
    "shape, path",
    [
        ((2, 1280, 16, 16), "one_pass"),  # the brief's example: 10240 elements
        ((2, 1280, 8, 8), "one_pass"),
        ((2, 2560, 8, 8), "one_pass"),
        ((2, 1920, 16, 16), "one_pass"),
        ((2, 2560, 16, 16), "looped"),  # Cg 80 x 256: 32768 lanes, past the limit (spills in channels_last)
        ((2, 640, 32, 32), "looped"),  # Cg 20 x 1024: 32768 lanes
        ((2, 320, 64, 64), "looped"),  # the first level: 40960 elements per group
        ((2, 320, 128, 128), "looped"),  # SDXL's first level: 163840
        ((1, 256, 512, 512), "looped"),  # the VAE's largest group at 512x512: Cg 8 x 512^2 = 2**21
        ((1, 128, 1024, 1024), "split"),  # the SDXL VAE at 1024x1024: Cg 4 x 1024^2, past the threshold
    ],
    ids=str,
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_plan_takes_one_launch_where_a_group_fits(shape, path, channels_last):
    x = torch.empty(shape, device="meta", dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    config = gn.plan(x, 32, x)
    kinds = {"one_pass": gn.OnePassConfig, "looped": gn.LoopedConfig}
    assert type(config) is kinds[path] if path in kinds else not isinstance(config, tuple(kinds.values()))
    expected = {"one_pass": (1, 1), "looped": (1, 2), "split": (2, 2)}[path]
    assert gn.launches_and_reads(config, shape[2] * shape[3]) == expected
    if path == "one_pass":
        assert config.block_hw * config.block_c <= gn.ONE_PASS_MAX_LANES
        assert config.block_hw >= shape[2] * shape[3] and config.block_c >= shape[1] // 32
    if path == "looped":
        assert config.block_hw * config.block_c <= gn.MAX_TILE
        assert shape[1] // 32 * shape[2] * shape[3] <= gn.LOOPED_MAX_GROUP_ELEMENTS


def test_looped_config_that_does_not_tile_the_group_is_rejected():
    x, weight, bias = _random_inputs((1, 64, 4, 4), torch.float32, DEVICE, False)
    with pytest.raises(ValueError, match="does not tile a group"):
        gn.launch(x, 32, weight, bias, 1e-5, None, _poisoned_like(x), gn.LoopedConfig(8, 2, 1, 1, 1))


def test_one_pass_config_that_does_not_cover_the_group_is_rejected():
    x, weight, bias = _random_inputs((1, 64, 4, 4), torch.float32, DEVICE, False)
    with pytest.raises(ValueError, match="does not cover a group"):
        gn.launch(x, 32, weight, bias, 1e-5, None, _poisoned_like(x), gn.OnePassConfig(8, 2, 1))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_output_keeps_memory_format(channels_last):
    x, weight, bias = _random_inputs((2, 64, 5, 6), torch.float32, DEVICE, channels_last)
    y = group_norm(x, 32, weight, bias, activation="silu")  # functional op, allocates its output
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    _assert_close_to_reference(x, weight, bias, "silu", y)


@pytest.mark.parametrize("affine", ["none", "weight_only", "bias_only"])
def test_weight_and_bias_optional(affine):
    x, weight, bias = _random_inputs((2, 96, 5, 7), torch.float32, DEVICE, False)
    weight = weight if affine == "weight_only" else None
    bias = bias if affine == "bias_only" else None
    y = group_norm(x, 32, weight, bias, out=_poisoned_like(x))
    _assert_close_to_reference(x, weight, bias, None, y)


def test_fp32_weights_with_fp16_input_and_custom_eps():
    x, weight, bias = _random_inputs((1, 320, 6, 6), torch.float16, DEVICE, True)
    y = group_norm(x, 32, weight.float(), bias.float(), eps=1e-6, activation="silu", out=_poisoned_like(x))
    _assert_close_to_reference(x, weight.float(), bias.float(), "silu", y, eps=1e-6)


@pytest.mark.parametrize("path", ["one_pass", "looped"])
def test_large_mean_small_variance_keeps_precision(path):
    # mean 1000, std 0.01: E[x^2] - E[x]^2 in fp32 would lose every significant digit. The looped kernel
    # over 16-position tiles: the statistics merge across 7 tiles (Chan), never through sums of squares.
    x = torch.randn(2, 64, 9, 11, generator=seeding.generator(), dtype=torch.float64).to(DEVICE) * 0.01 + 1000
    out = torch.full((2, 64, 9, 11), float("nan"), device=DEVICE)
    if path == "one_pass":
        y = group_norm(x.float(), 32, out=out)
    else:
        y = out
        gn.launch(x.float(), 32, None, None, 1e-5, None, out, gn.LoopedConfig(16, 2, 1, 7, 1))
    ref = group_norm_reference(x, 32)
    assert (y.double() - ref).abs().max().item() < 0.05


def test_several_tiles_per_program_with_empty_tail_tiles():
    # Cg = 5 over 2-channel tiles (a masked channel tail), 63 positions over 16-position tiles, and
    # 12 tiles in chunks of 5: the last program meets two tiles past the end of the group.
    x, weight, bias = _random_inputs((1, 160, 7, 9), torch.float32, DEVICE, False)
    config = gn.LaunchConfig(
        block_hw=16, block_c=2, num_c_tiles=3, num_tiles=12, tiles_per_prog=5, split=3, num_warps=1
    )
    out = _poisoned_like(x)
    gn.launch(x, 32, weight, bias, 1e-5, "silu", out, config)
    _assert_close_to_reference(x, weight, bias, "silu", out)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_looped_kernel_over_channel_and_position_tiles(channels_last):
    # The looped kernel's tile walk on both axes: Cg = 5 over 2-channel tiles (a masked channel tail) and
    # 63 positions over 16-position tiles (a masked position tail), 12 tiles per group, with a shift.
    x, weight, bias = _random_inputs((1, 160, 7, 9), torch.float32, DEVICE, channels_last)
    shift = _shift("per_item", 1, 160, torch.float32, seed=7)
    out = _poisoned_like(x)
    gn.launch(x, 32, weight, bias, 1e-5, "silu", out, gn.LoopedConfig(16, 2, 3, 12, 1), shift=shift)
    _assert_close_to_reference(x, weight, bias, "silu", out, shift=shift)


def test_non_flattenable_input_is_handled():
    x, weight, bias = _random_inputs((2, 64, 12, 10), torch.float32, DEVICE, False)
    view = x[:, :, ::2, :]  # stride_h != W * stride_w: H and W cannot be flattened
    y = group_norm(view, 32, weight, bias, out=_poisoned_like(view.contiguous()))
    _assert_close_to_reference(view, weight, bias, None, y)


def test_choose_config_fills_an_h100_at_sd15_batch_2():
    config = gn.choose_config(2, 10, 64 * 64, 32, channels_contiguous=False, sm_count=132)
    assert 2 * 32 * config.split >= 2 * 132  # more than the 64 (batch, group) pairs
    assert config.block_hw * config.block_c <= gn.MAX_TILE
    assert config.split <= gn.MAX_SPLIT and config.split * config.tiles_per_prog >= config.num_tiles


def test_custom_op_under_torch_compile_and_export():
    x, weight, bias = _random_inputs((1, 64, 4, 5), torch.float32, DEVICE, False)

    class Norm(torch.nn.Module):
        def forward(self, x):
            return group_norm(x, 32, weight, bias, activation="silu") * 2

    compiled = torch.compile(Norm(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), Norm()(x))
    exported = torch.export.export(Norm(), (x,))
    assert any(node.target is torch.ops.sd_kernels.group_norm.default for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), Norm()(x))


# channels_last inputs take the chunked kernels (whole groups per power-of-two chunk of lanes): one case
# per channel count of the real models (32 groups), each at odd spatial sizes, rotating batch, dtype,
# SiLU and affine so that every combination appears without a full cross product (the interpreter is slow).
CHANNELS_LAST_CASES = [
    ((1, 320, 5, 7), torch.float16, "silu", "affine"),  # Cg 10: 12 groups per 128 lanes, last chunk 8 groups
    ((2, 640, 3, 5), torch.bfloat16, None, "weight_only"),  # Cg 20: 6 groups per chunk, 6 chunks
    ((3, 960, 2, 3), torch.float32, "silu", "none"),  # Cg 30: 4 groups per chunk, batch 3
    ((1, 1280, 3, 1), torch.float16, None, "bias_only"),  # Cg 40: 3 groups per chunk, 11 chunks
    ((2, 1920, 1, 3), torch.bfloat16, "silu", "affine"),  # Cg 60: 2 groups per chunk
    ((1, 2560, 2, 3), torch.float32, None, "affine"),  # Cg 80: 3 groups in 256 lanes
    ((3, 128, 9, 7), torch.float16, "silu", "none"),  # VAE Cg 4: 16 groups in 64 lanes, 63 positions
    ((2, 256, 5, 3), torch.bfloat16, "silu", "affine"),  # VAE Cg 8
    ((1, 512, 6, 5), torch.float32, "silu", "weight_only"),  # VAE Cg 16
    ((2, 1280, 3, 3), torch.float16, "silu", "affine"),  # deepest SD1.5 level at batch 2, fp16
]


def _affine(weight, bias, affine):
    return (
        weight if affine in ("affine", "weight_only") else None,
        bias if affine in ("affine", "bias_only") else None,
    )


@pytest.mark.parametrize("shape, dtype, activation, affine", CHANNELS_LAST_CASES, ids=str)
def test_channels_last_every_channel_count(shape, dtype, activation, affine):
    assert gn.choose_channels_last_config(shape[0], shape[1], shape[2] * shape[3], 32) is not None
    x, weight, bias = _random_inputs(shape, dtype, DEVICE, channels_last=True)
    weight, bias = _affine(weight, bias, affine)
    y = group_norm(x, 32, weight, bias, activation=activation, out=_poisoned_like(x))
    _assert_close_to_reference(x, weight, bias, activation, y)


def test_channels_last_several_tiles_per_program_and_partial_chunk():
    # 77 positions in 2-row tiles = 39 tiles (the last one row), 2 per program: the 20th program meets a
    # tile past the end, and 20 partials per group take two steps of the apply kernel's merge loop.
    # 32 groups of 10 in chunks of 12: the last chunk holds 8 groups in 128 lanes.
    assert gn.MERGE_BLOCK < 20
    x, weight, bias = _random_inputs((2, 320, 7, 11), torch.float32, DEVICE, channels_last=True)
    config = gn.ChannelsLastConfig(
        groups_per_chunk=12,
        block_c=128,
        block_g=16,
        num_chunks=3,
        block_hw=2,
        num_tiles=39,
        tiles_per_prog=2,
        split=20,
        num_warps=1,
    )
    out = _poisoned_like(x)
    gn.launch(x, 32, weight, bias, 1e-5, "silu", out, config)
    _assert_close_to_reference(x, weight, bias, "silu", out)


def test_channels_last_unaligned_chunks():
    # Cg = 65 (odd): no chunk of whole groups is a multiple of 8 channels and fits 512 lanes, so chunks
    # start unaligned (3 groups in 256 lanes): slower scalar loads, same results.
    assert gn._channel_chunking(1040, 16) == (256, 3)
    x, weight, bias = _random_inputs((1, 1040, 3, 2), torch.float32, DEVICE, channels_last=True)
    y = group_norm(x, 16, weight, bias, activation="silu", out=_poisoned_like(x))
    ref = group_norm_reference(x.double(), 16, weight.double(), bias.double(), activation="silu")
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)


def test_channels_last_group_wider_than_a_chunk_takes_per_group_tiles():
    # One group of 640 channels does not fit CHANNELS_LAST_MAX_WIDTH lanes: the per-group kernels serve.
    assert gn.choose_channels_last_config(1, 640, 15, 1) is None
    x, weight, bias = _random_inputs((1, 640, 3, 5), torch.float32, DEVICE, channels_last=True)
    y = group_norm(x, 1, weight, bias, activation="silu", out=_poisoned_like(x))
    ref = group_norm_reference(x.double(), 1, weight.double(), bias.double(), activation="silu")
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)


def test_channels_last_input_into_nchw_output_and_padded_rows():
    # A channel slice of a wider channels_last tensor (positions 640 channels apart, not 320), written
    # into an NCHW-contiguous `out`: the per-group kernels, addressed through both tensors' strides.
    wide, weight, bias = _random_inputs((2, 640, 3, 5), torch.float32, DEVICE, channels_last=True)
    x, weight, bias = wide[:, :320], weight[:320], bias[:320]
    assert x.stride(1) == 1 and x.stride(3) == 640
    out = torch.full(x.shape, float("nan"), device=DEVICE)
    y = group_norm(x, 32, weight, bias, activation="silu", out=out)
    _assert_close_to_reference(x, weight, bias, "silu", y)
    # The same slice into a channels_last `out`: the chunked kernels with a row stride of 640.
    out = _poisoned_like(x.contiguous(memory_format=torch.channels_last))
    y = group_norm(x, 32, weight, bias, activation="silu", out=out)
    _assert_close_to_reference(x, weight, bias, "silu", y)


@pytest.mark.parametrize("channels", gn._UNET_CHANNELS + gn._VAE_CHANNELS)
def test_channels_last_chunks_are_aligned_and_fill_an_h100(channels):
    width, per_chunk = gn._channel_chunking(channels, 32)
    cg = channels // 32
    assert per_chunk * cg <= width and (per_chunk * cg) % gn.CHUNK_ALIGN == 0  # 16-byte aligned chunk starts
    assert channels / (triton.cdiv(32, per_chunk) * width) >= 0.8  # few masked lanes
    config = gn.choose_channels_last_config(2, channels, 64 * 64, 32, sm_count=132)
    assert config.block_hw * config.block_c <= gn.MAX_TILE
    stats_programs, tiles = 2 * config.num_chunks * config.split, 2 * config.num_chunks * config.num_tiles
    assert stats_programs >= min(2 * 132, tiles)  # the stats pass fills the chip at batch 2 (or has every tile)
    assert config.split * config.tiles_per_prog >= config.num_tiles > (config.split - 1) * config.tiles_per_prog
    assert config.block_g * config.split <= gn.MERGE_LANES  # bounded merge work per apply program


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: group_norm(x[0], 32, w, w), "4-D"),
        (lambda x, w: group_norm(x, 30, None, None), "divisible by num_groups"),
        (lambda x, w: group_norm(x, 0, None, None), "num_groups"),
        (lambda x, w: group_norm(x, 32, w[:10], None), "weight must have shape"),
        (lambda x, w: group_norm(x, 32, None, w[:, None]), "bias must have shape"),
        (lambda x, w: group_norm(x.double(), 32, None, None), "dtype"),
        (lambda x, w: group_norm(x.int(), 32, None, None), "dtype"),
        (lambda x, w: group_norm(x, 32, w.double(), None), "weight dtype"),
        (lambda x, w: group_norm(x, 32, None, None, activation="gelu"), "activation"),
        (lambda x, w: group_norm(x, 32, None, None, eps=-1.0), "eps"),
        (lambda x, w: group_norm(x, 32, None, None, out=torch.empty(2, 64, 3, 3)), "out must match"),
        (lambda x, w: group_norm(x, 32, None, None, out=x.half()), "out must match"),
        (lambda x, w: group_norm(x.numpy(), 32, None, None), "torch.Tensor"),
        (lambda x, w: group_norm(x, 32, None, None, out=x.numpy()), "out must be a tensor"),
        (lambda x, w: group_norm(x, 32, None, None, out=torch.empty(2, 64, 8, 4)[:, :, ::2]), "flattening H and W"),
        (lambda x, w: group_norm(x, 32, shift=w), r"shift must have shape \(2, 64\) or \(1, 64\)"),
        (lambda x, w: group_norm(x, 32, shift=torch.zeros(3, 64)), r"shift must have shape"),
        (lambda x, w: group_norm(x, 32, shift=torch.zeros(2, 32)), r"shift must have shape"),
        (lambda x, w: group_norm(x, 32, shift=torch.zeros(2, 64).half()), "shift dtype"),
        (lambda x, w: group_norm(x, 32, shift=torch.zeros(2, 64, device="meta")), "shift is on meta"),
        (lambda x, w: group_norm(x, 32, shift=[0.0] * 64), "shift must be a tensor"),
        # Shape checks alone: a meta tensor allocates nothing.
        (lambda x, w: group_norm(torch.empty(1, 32, 2**16, 2**15, device="meta"), 32), r">= 2\*\*31 elements"),
    ],
)
def test_bad_input_gives_clear_error(call, message):
    gen = seeding.generator()
    x = torch.randn(2, 64, 4, 4, generator=gen) + 3
    w = torch.randn(64, generator=gen)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, w)


def test_cpu_tensor_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"x is on cpu; the kernel runs on CUDA.*TRITON_INTERPRET=1"):
        group_norm(torch.randn(1, 64, 3, 3, generator=seeding.generator()) + 3, 32)


def test_reference_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        group_norm_reference(torch.randn(1, 32, 2, 2, generator=seeding.generator()), 32, activation="relu")


# GPU variants at the models' full sizes; skipped without CUDA.
GPU_SHAPES = [
    (2, 320, 64, 64),  # SD1.5 first level at batch 2: the headline shape
    (2, 1280, 8, 8),  # SD1.5 deepest level: tiny groups
    (2, 2560, 16, 16),  # up-block concat
    (1, 640, 96, 96),  # SD2 768x768 latent resolution: 9216 positions, not a power of two
    (2, 1920, 32, 32),  # SDXL concat
    (1, 128, 512, 512),  # VAE decoder last level: 1M-element groups, capped split
    (1, 512, 64, 64),  # VAE decoder first level
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_matches_reference(shape, dtype, channels_last):
    x, weight, bias = _random_inputs(shape, dtype, "cuda", channels_last)
    for activation in (None, "silu"):
        y = group_norm(x, 32, weight, bias, activation=activation, out=_poisoned_like(x))
        _assert_close_to_reference(x, weight, bias, activation, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_capture_and_compile():
    x, weight, bias = _random_inputs((2, 320, 64, 64), torch.float16, "cuda", True)
    eager = group_norm(x, 32, weight, bias, activation="silu")
    static_out = torch.empty_like(x)
    group_norm(x, 32, weight, bias, activation="silu", out=static_out)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group_norm(x, 32, weight, bias, activation="silu", out=static_out)
    x.copy_(torch.randn(x.shape, generator=seeding.generator()).to(x) * 2 + 3)
    graph.replay()
    torch.testing.assert_close(static_out, group_norm(x, 32, weight, bias, activation="silu"))
    assert not torch.equal(static_out, eager)
    compiled = torch.compile(lambda t: group_norm(t, 32, weight, bias, activation="silu"), fullgraph=True)
    torch.testing.assert_close(compiled(x), static_out)


# ---------------------------------------------------------------- grid axis 1 limit (65535 on CUDA)
class _RecordingKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args)` records the grid and arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args))


@pytest.mark.parametrize(
    "shape, channels_last, kernel",
    [
        ((1, 128, 2048, 2048), True, "_group_norm_cl_apply_kernel"),  # VAE decode at 2048^2: HW/64 = 65536
        ((1, 128, 3000, 3000), True, "_group_norm_cl_apply_kernel"),  # 140625 tiles: three launches
        ((1, 32, 16384, 16400), False, "_group_norm_apply_kernel"),  # NCHW, 4096-position tiles: 65600
    ],
)
def test_apply_launches_keep_grid_axis_1_within_the_cuda_limit(monkeypatch, shape, channels_last, kernel):
    # Meta tensors: the launcher's arithmetic at full size, no memory, kernels recorded instead of run.
    apply_arg_names = getattr(gn, kernel).arg_names
    for name in (
        "_group_norm_stats_kernel",
        "_group_norm_apply_kernel",
        "_group_norm_cl_stats_kernel",
        "_group_norm_cl_apply_kernel",
    ):
        monkeypatch.setattr(gn, name, _RecordingKernel())
    x = torch.empty(shape, device="meta", dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    weight = bias = torch.empty(shape[1], device="meta", dtype=torch.float16)
    gn.launch(x, 32, weight, bias, 1e-5, "silu", out)
    launches = getattr(gn, kernel).launches
    hw = shape[2] * shape[3]
    block_hw = (
        gn.choose_channels_last_config(1, shape[1], hw, 32)
        if channels_last
        else gn.choose_config(1, shape[1] // 32, hw, 32, False)
    ).block_hw
    assert len(launches) > 1 and all(grid[1] <= gn.MAX_GRID_Y for grid, _ in launches)
    spatial_stride = shape[1] if channels_last else 1
    hw_arg = apply_arg_names.index("HW")  # HW's position in the apply kernel's arguments
    covered = 0
    for grid, args in launches:
        first = (args[0].storage_offset() - x.storage_offset()) // spatial_stride
        assert first == covered and args[1].storage_offset() // spatial_stride == first
        assert args[hw_arg] == hw - first
        covered += grid[1] * block_hw
    assert covered >= hw > covered - block_hw  # every position in exactly one launch's tiles


@pytest.mark.parametrize("channels_last", [True, False])
def test_apply_split_into_several_launches_gives_the_same_result(monkeypatch, channels_last):
    # The same offset launches at a size the interpreter runs: at most 2 tiles per launch.
    monkeypatch.setattr(gn, "MAX_GRID_Y", 2)
    x, weight, bias = _random_inputs((2, 64, 9, 8), torch.float32, DEVICE, channels_last=channels_last, seed=11)
    hw = x.shape[2] * x.shape[3]
    if channels_last:
        config = dataclasses.replace(
            gn.choose_channels_last_config(2, 64, hw, 32), block_hw=8, num_tiles=9, tiles_per_prog=3, split=3
        )
    else:
        config = dataclasses.replace(
            gn.choose_config(2, 2, hw, 32, False), block_hw=8, num_tiles=9 * 1, tiles_per_prog=3, split=3
        )
    assert len(gn._spatial_launches(hw, 8)) == 5  # 9 tiles, 2 per launch
    out = _poisoned_like(x)
    gn.launch(x, 32, weight, bias, 1e-5, "silu", out, config)
    _assert_close_to_reference(x, weight, bias, "silu", out)
