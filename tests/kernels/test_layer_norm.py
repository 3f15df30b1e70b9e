"""LayerNorm and add+LayerNorm kernel vs a float64 reference, under the Triton interpreter on CPU (and on CUDA).

Inputs are fresh random tensors with mean 3 and std 2 (a non-zero mean exposes E[x^2] - E[x]^2
cancellation); weights and biases are random, far from the identity init. Outputs are poisoned with NaN
through `launch` before every run, so an element the kernel fails to write cannot pass.

The interpreter pays per program, so on the CPU the shape sweeps run fewer, taller row blocks than the
launcher would choose (`_sweep_config`: the same kernel with a larger BLOCK_M); the launcher's own configs
run in `test_chosen_configs_on_small_grids` and through the public ops.
"""

import dataclasses

import pytest
import torch
import triton

import kernels.layer_norm as ln
from tests import seeding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol). fp32 is compared directly with the float64 reference. For fp16/bf16 the rule is
# max|kernel - ref64| <= 2 * max|torch same-dtype - ref64| + atol (rtol unused there).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 0.0),
    torch.bfloat16: (1e-2, 0.0),
}

# (token rows, C): C is the real width; rows are the real guided (batch 2) token counts except where noted.
SHAPES = [
    (2 * 64 * 64, 320),  # SD 1.5 first level (64x64 latent tokens) at its real size
    (2 * 32 * 32, 640),  # SD 1.5 second level; SDXL 1024px's 640-wide level has 2 x 64 x 64 of these rows
    (2 * 16 * 16, 1280),  # SD 1.5 third level
    (2 * 8 * 8, 1280),  # SD 1.5 deepest level: one row per program on the GPU (128 programs)
    (2 * 96 * 6, 320),  # SD 2.1 768px first level (2 x 96 x 96 tokens), rows scaled down
    (2 * 12 * 12, 1280),  # SD 2.1 768px deepest level
    (2 * 32 * 3, 1280),  # SDXL 1024px: its 1280-wide level is 32x32 (rows scaled), the widest UNet row
    (37, 640),  # an odd row count that masks the last row block
    (2 * 8 * 8, 1024),  # a power-of-two width: no masked lane
    (19, 1000),  # a width that is neither a power of two nor a multiple of 16: masked lanes, unaligned rows
    (5, 24),  # the tiny test models' width
    (2, ln.MAX_WIDTH),  # the widest row the kernel takes: 8 warps
]


# Programs per sweep launch on the CPU: enough to cover a masked last row block, few enough to be quick.
INTERPRETER_PROGRAMS = 4


def _sweep_config(rows, width):
    config = ln.choose_config(rows, width)
    if DEVICE == "cuda":
        return config
    block_m = max(config.block_m, triton.next_power_of_2(triton.cdiv(rows, INTERPRETER_PROGRAMS)))
    return dataclasses.replace(config, block_m=block_m)


def _random(rows, width, dtype, *parts):
    gen = seeding.generator(rows, width, str(dtype), *parts)
    x = (torch.randn(rows, width, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype).to(DEVICE)
    update = (torch.randn(rows, width, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype).to(DEVICE)
    weight = (torch.randn(width, generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype).to(DEVICE)
    bias = (torch.randn(width, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    return x, update, weight, bias


def _poisoned(x):
    return torch.full_like(x, float("nan"))


def _truncate_to_bf16(t):
    """fp64 -> bf16 by dropping the low 16 bits of the fp32 value, as the interpreter casts."""
    bits = t.float().view(torch.int32) & -65536  # 0xFFFF0000
    return bits.view(torch.float32).double()


def _assert_normalised(source, weight, bias, y, eps=1e-5):
    """y against layer_norm(source) in float64, by the tolerance table."""
    as64 = lambda t: t.double() if t is not None else None  # noqa: E731
    ref = ln.layer_norm_reference(source.double(), as64(weight), as64(bias), eps)
    assert torch.isfinite(y).all(), "kernel left unwritten (NaN) or non-finite outputs"
    atol, rtol = TOLERANCES[source.dtype]
    if source.dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
        return
    err = (y.double() - ref).abs().max().item()
    torch_err = (ln.layer_norm_reference(source, weight, bias, eps, upcast=False).double() - ref).abs().max().item()
    if source.dtype == torch.bfloat16 and y.device.type == "cpu":
        # The interpreter truncates fp32 -> bf16 on store where a GPU rounds to nearest (see test_group_norm).
        torch_err = max(torch_err, (_truncate_to_bf16(ref) - ref).abs().max().item())
    assert err <= 2 * torch_err + atol, f"{source.dtype}: kernel error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


def _expected_sum(x, update):
    """torch's x + update; under the interpreter bf16 stores truncate the fp32 sum instead of rounding."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return _truncate_to_bf16(x.double() + update.double()).to(torch.bfloat16)
    return x + update


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows, width", SHAPES)
def test_add_layer_norm_matches_reference_on_sd_shapes(rows, width, dtype):
    if rows * width > 1_000_000 and dtype != torch.float16 and DEVICE == "cpu":
        pytest.skip("the full first level runs once, in fp16, under the interpreter")
    x, update, weight, bias = _random(rows, width, dtype)
    s, y = _poisoned(x), _poisoned(x)
    ln.launch(x, weight, bias, 1e-5, y, update=update, s=s, config=_sweep_config(rows, width))
    assert torch.equal(s, _expected_sum(x, update)), "s is not the residual sum x + update"
    _assert_normalised(s, weight, bias, y)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows, width", [SHAPES[3], SHAPES[4], SHAPES[9]])
def test_layer_norm_matches_reference(rows, width, dtype):
    x, _, weight, bias = _random(rows, width, dtype)
    y = _poisoned(x)
    ln.launch(x, weight, bias, 1e-5, y, config=_sweep_config(rows, width))
    _assert_normalised(x, weight, bias, y)


@pytest.mark.parametrize(
    "rows, width, block_m",
    [
        (2, 1280, 1),  # the 8x8 level's rows: one per program, so 128 programs at batch 2
        (5, 640, 2),  # two rows per program, the last block half masked
        (19, 320, 8),  # the first level's full 8-row blocks (4096 elements), the last one masked
    ],
)
def test_chosen_configs_on_small_grids(rows, width, block_m):
    x, update, weight, bias = _random(rows, width, torch.float16)
    config = dataclasses.replace(ln.choose_config(rows, width), block_m=block_m)
    assert config.block_m == ln.choose_config(256 * block_m, width).block_m  # the launcher's choice at scale
    s, y = _poisoned(x), _poisoned(x)
    ln.launch(x, weight, bias, 1e-5, y, update=update, s=s, config=config)
    assert torch.equal(s, x + update)
    _assert_normalised(s, weight, bias, y)


def test_without_affine_and_with_another_eps():
    x, update, _, _ = _random(9, 320, torch.float16)
    s, y = ln.add_layer_norm(x, update, None, None, eps=1e-2)
    _assert_normalised(s, None, None, y, eps=1e-2)
    _assert_normalised(x, None, None, ln.layer_norm(x, eps=1e-2), eps=1e-2)


def test_public_ops_keep_leading_dims_and_read_strided_rows():
    # [B, N, C] as the transformer block holds it, and a row-strided view (every other token) read in place.
    x, update, weight, bias = _random(2 * 10, 320, torch.float16)
    x, update = x.view(2, 10, 320), update.view(2, 10, 320)
    s, y = ln.add_layer_norm(x, update, weight, bias)
    assert s.shape == y.shape == (2, 10, 320) and s.is_contiguous() and y.is_contiguous()
    assert torch.equal(s, x + update)
    _assert_normalised(s.view(20, 320), weight, bias, y.view(20, 320))
    strided = x[:, ::2]
    _assert_normalised(strided.reshape(-1, 320), weight, bias, ln.layer_norm(strided, weight, bias).reshape(-1, 320))


def test_strided_token_streams_are_read_in_place_and_s_keeps_their_layout():
    # The tokens of an NCHW activation, [B, H*W, C] with column stride H*W (Transformer2DModel's view of an
    # NCHW model's stream), and a 4-D [B, H, W, C] stream whose leading dims flatten.
    x, update, weight, bias = _random(2 * 5 * 6, 64, torch.float16)
    nchw = x.view(2, 30, 64).transpose(1, 2).contiguous()  # [2, 64, 30]
    tokens = nchw.transpose(1, 2)
    assert tokens.stride() == (64 * 30, 1, 30)
    upd = update.view(2, 30, 64)
    s, y = ln.add_layer_norm(tokens, upd, weight, bias)
    assert s.stride() == tokens.stride() and y.is_contiguous()
    assert torch.equal(s, tokens + upd)
    _assert_normalised(s.reshape(60, 64), weight, bias, y.view(60, 64))
    s4, y4 = ln.add_layer_norm(x.view(2, 5, 6, 64), update.view(2, 5, 6, 64), weight, bias)
    assert torch.equal(s4.view(60, 64), s.reshape(60, 64)) and torch.equal(y4.view(60, 64), y.view(60, 64))


def test_config_shrinks_row_blocks_only_to_fill_the_grid():
    assert ln.choose_config(2 * 64 * 64, 320) == ln.LayerNormConfig(block_m=8, block_c=512, num_warps=4)
    assert ln.choose_config(2 * 8 * 8, 1280) == ln.LayerNormConfig(block_m=1, block_c=2048, num_warps=4)
    assert ln.choose_config(4, ln.MAX_WIDTH).num_warps == 8
    assert ln.choose_config(2 * 8 * 8, 1000).num_warps == 8  # a width the JIT cannot prove aligned


def test_fakes_give_the_output_shapes_without_running():
    x = torch.empty(2, 4096, 320, dtype=torch.float16, device="meta")
    w = torch.empty(320, dtype=torch.float16, device="meta")
    y = torch.ops.sd_kernels.layer_norm(x, w, w, 1e-5)
    s, y2 = torch.ops.sd_kernels.add_layer_norm(x, x, w, w, 1e-5)
    for t in (y, s, y2):
        assert t.shape == x.shape and t.dtype == torch.float16 and t.device.type == "meta"


def _tensor(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((_tensor(4, 8, dtype=torch.float64), None), TypeError, "dtype torch.float64"),
        (([1.0, 2.0], None), TypeError, "x must be a torch.Tensor"),
        ((_tensor(4, 0), None), ValueError, "non-empty last dim"),
        ((_tensor(1, ln.MAX_WIDTH + 1), None), ValueError, f"at most {ln.MAX_WIDTH}"),
        ((_tensor(4, 8), _tensor(4, 9)), ValueError, "update must match x"),
        ((_tensor(4, 8), _tensor(4, 8, dtype=torch.float32)), ValueError, "update must match x"),
        ((_tensor(4, 8), _tensor(4, 8), _tensor(9)), ValueError, r"weight must have shape \(8,\)"),
        ((_tensor(4, 8), _tensor(4, 8), None, _tensor(8, dtype=torch.int32)), TypeError, "bias has dtype"),
        ((_tensor(4, 8), _tensor(4, 8), None, None, -1.0), ValueError, "eps must be a non-negative"),
    ],
)
def test_bad_inputs_are_named(args, error, message):
    with pytest.raises(error, match=message):
        x, update, *rest = args
        if update is None:
            ln.layer_norm(x, *rest)
        else:
            ln.add_layer_norm(x, update, *rest)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA"):
        ln.layer_norm(torch.zeros(2, 8))


def test_launch_rejects_mismatched_outputs():
    x, update, weight, bias = _random(4, 64, torch.float16)
    with pytest.raises(ValueError, match=r"y must have x's shape \(4, 64\)"):
        ln.launch(x, weight, bias, 1e-5, _tensor(4, 32))
    with pytest.raises(ValueError, match="update and s come together"):
        ln.launch(x, weight, bias, 1e-5, _poisoned(x), update=update)
