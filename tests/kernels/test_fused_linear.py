"""Fused-epilogue GEMMs (kernels/fused_linear.py) vs a float64 reference, under the interpreter on CPU.

Widths are the real SD ones (C = 320, 640, 1280; inner = 4C), token counts small so the interpreter
stays fast. Outputs are poisoned with NaN through the launchers' `out` before each run, so an element
the kernel fails to write cannot pass.
"""

import importlib

import pytest
import torch

from tests import seeding

fl = importlib.import_module("kernels.fused_linear")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 is compared directly with the float64 reference; for fp16/bf16 the rule is
# max|kernel - ref64| <= 2 * max|torch same-dtype - ref64| + atol.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 0.0), torch.bfloat16: (2e-2, 0.0)}

# (tokens, C): the ff projection is [tokens, C] @ [8C, C]^T -> GEGLU -> [tokens, 4C]; the ff output is
# [tokens, 4C] @ [C, 4C]^T + residual; proj_out is [tokens, C] @ [C, C]^T + residual.
SHAPES = [
    (37, 320),  # SD 1.x / 2.x / SDXL first level; a row count that masks the last row block
    (16, 640),  # second level
    (9, 1280),  # deepest level (SDXL's inner width 5120)
    (5, 200),  # K = 200 and N = 200 not multiples of the 64 tiles: masked K loop and columns
]


def _tensors(*shapes, dtype, seed_key):
    gen = torch.Generator().manual_seed(seeding.derived_seed(*seed_key, str(dtype)))
    out = []
    for shape, scale in shapes:
        out.append((torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE))
    return out


def _assert_close(y, ref64, torch_same_dtype, dtype):
    assert torch.isfinite(y).all(), "kernel left unwritten (NaN) or non-finite outputs"
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref64, atol=atol, rtol=rtol)
        return
    err = (y.double() - ref64).abs().max().item()
    torch_err = (torch_same_dtype.double() - ref64).abs().max().item()
    if dtype == torch.bfloat16 and y.device.type == "cpu":
        # The interpreter truncates fp32 -> bf16 on store where a GPU rounds (see test_geglu).
        bits = ref64.float().view(torch.int32) & -65536
        torch_err = max(torch_err, (bits.view(torch.float32).double() - ref64).abs().max().item())
    assert err <= 2 * torch_err + atol, f"{dtype}: kernel error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


def _geglu_inputs(tokens, c, dtype, bias=True):
    k, inner = c, 4 * c
    x, w, b = _tensors(
        ((tokens, k), 1.0), ((2 * inner, k), k**-0.5), ((2 * inner,), 0.5), dtype=dtype, seed_key=(tokens, c)
    )
    return x, w, (b if bias else None)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("tokens, c", SHAPES)
def test_linear_geglu_matches_reference(tokens, c, dtype):
    x, w, b = _geglu_inputs(tokens, c, dtype)
    out = torch.full((tokens, w.shape[0] // 2), float("nan"), dtype=dtype, device=DEVICE)
    fl.launch_geglu(x, w, b, out)
    ref = fl.linear_geglu_reference(x.double(), w.double(), b.double())
    _assert_close(out, ref, fl.linear_geglu_reference(x, w, b, upcast=False), dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("tokens, c", SHAPES)
@pytest.mark.parametrize("k_mult", [4, 1], ids=["ff_out", "proj_out"])
def test_linear_bias_residual_matches_reference(tokens, c, k_mult, dtype):
    k = k_mult * c
    x, w, b, r = _tensors(
        ((tokens, k), 1.0), ((c, k), k**-0.5), ((c,), 0.5), ((tokens, c), 1.0), dtype=dtype, seed_key=(tokens, c, k)
    )
    out = torch.full((tokens, c), float("nan"), dtype=dtype, device=DEVICE)
    fl.launch_bias_residual(x, w, b, r, out)
    ref = fl.linear_bias_residual_reference(x.double(), w.double(), b.double(), r.double())
    _assert_close(out, ref, fl.linear_bias_residual_reference(x, w, b, r, upcast=False), dtype)


def test_public_ops_take_token_layout_without_bias_and_strided_weights():
    # [B, N, C] tokens; no bias; a 1x1 conv's channels_last weight read through its [:, :, 0, 0] view.
    dtype = torch.float32
    x, w, _ = _geglu_inputs(2 * 7, 64, dtype)
    y = fl.linear_geglu(x.view(2, 7, 64), w, None)
    assert y.shape == (2, 7, 256) and y.is_contiguous()
    ref = fl.linear_geglu_reference(x.double(), w.double(), None)
    torch.testing.assert_close(y.view(14, 256).double(), ref, atol=2e-5, rtol=1e-5)

    conv_w = torch.randn(96, 64, 1, 1, dtype=dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 7, 96, dtype=dtype, device=DEVICE)
    bias = torch.randn(96, dtype=dtype, device=DEVICE)
    y = fl.linear_bias_residual(x.view(2, 7, 64), conv_w[:, :, 0, 0], bias, res)
    ref = fl.linear_bias_residual_reference(
        x.view(2, 7, 64).double(), conv_w[:, :, 0, 0].double(), bias.double(), res.double()
    )
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)


def test_a_large_row_count_takes_the_large_tile():
    assert fl.choose_config(fl.LARGE_M, torch.float16, geglu=False).block_m == 128
    assert fl.choose_config(128, torch.float16, geglu=False).block_m == 64
    # The fp16 large-tile config on a small fp32 problem (masked rows, a ragged K): that path runs here too.
    x, w, b, r = _tensors(
        ((3, 72), 1.0), ((40, 72), 0.1), ((40,), 0.5), ((3, 40), 1.0), dtype=torch.float32, seed_key=(3,)
    )
    out = torch.full((3, 40), float("nan"), device=DEVICE)
    fl.launch_bias_residual(x, w, b, r, out, config=fl.choose_config(fl.LARGE_M, torch.float16, geglu=False))
    ref = fl.linear_bias_residual_reference(x.double(), w.double(), b.double(), r.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_fake_implementations_give_output_shapes():
    x = torch.empty(2, 4096, 320, dtype=torch.float16, device="meta")
    w = torch.empty(2560, 320, dtype=torch.float16, device="meta")
    assert torch.ops.sd_kernels.linear_geglu(x, w, None).shape == (2, 4096, 1280)
    h = torch.empty(2, 4096, 1280, dtype=torch.float16, device="meta")
    w2 = torch.empty(320, 1280, dtype=torch.float16, device="meta")
    y = torch.ops.sd_kernels.linear_bias_residual(h, w2, None, x)
    assert y.shape == (2, 4096, 320) and y.device.type == "meta"


def _bad(dtype=torch.float16):
    return torch.zeros(4, 8, dtype=dtype), torch.zeros(16, 8, dtype=dtype), torch.zeros(16, dtype=dtype)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (
            (torch.zeros(4, 8, dtype=torch.float16), torch.zeros(16, 6, dtype=torch.float16), None),
            ValueError,
            "K = x's last dim 8",
        ),
        ((*_bad()[:2], torch.zeros(15, dtype=torch.float16)), ValueError, r"bias must be \[16\]"),
        ((_bad()[0], torch.zeros(15, 8, dtype=torch.float16), None), ValueError, "even row count"),
        ((_bad()[0], torch.zeros(16, 8, dtype=torch.float32), None), TypeError, "weight has dtype torch.float32 but x"),
        ((*_bad(torch.float64)[:2], None), TypeError, "x has dtype torch.float64"),
        (([1.0], _bad()[1], None), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_linear_geglu_names_bad_inputs(args, error, message):
    with pytest.raises(error, match=message):
        fl.linear_geglu(*args)


def test_linear_bias_residual_names_bad_inputs():
    x, w, b = _bad()
    with pytest.raises(ValueError, match=r"residual must be \(4, 16\)"):
        fl.linear_bias_residual(x, w, b, torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="residual has dtype torch.bfloat16 but x"):
        fl.linear_bias_residual(x, w, b, torch.zeros(4, 16, dtype=torch.bfloat16))


def test_launchers_reject_mismatched_outputs():
    x, w, b = _bad(torch.float32)
    with pytest.raises(ValueError, match="weight \\[8, K\\]"):
        fl.launch_geglu(x, w, b, torch.empty(4, 4))
    with pytest.raises(ValueError, match="residual and out"):
        fl.launch_bias_residual(x, w, b, torch.empty(4, 8), torch.empty(4, 16))


# ---- full-size shapes on the GPU (gpu_check.sh runs these at fp16) ----

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (tokens, C) of a guided batch: SD 1.5 / 2.x levels at 512² (2 x 64², 32², 16², 8²) and SDXL's at 1024².
FULL_SHAPES = [(8192, 320), (2048, 640), (512, 1280), (128, 1280), (8192, 640), (2048, 1280)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens, c", FULL_SHAPES, ids=lambda v: str(v))
def test_full_size_on_gpu(tokens, c, dtype):
    x, w, b = _geglu_inputs(tokens, c, dtype)
    out = torch.full((tokens, w.shape[0] // 2), float("nan"), dtype=dtype, device=DEVICE)
    fl.launch_geglu(x, w, b, out)
    ref = fl.linear_geglu_reference(x.double(), w.double(), b.double())
    _assert_close(out, ref, fl.linear_geglu_reference(x, w, b, upcast=False), dtype)

    h, w2, b2, r = _tensors(
        ((tokens, 4 * c), 1.0),
        ((c, 4 * c), (4 * c) ** -0.5),
        ((c,), 0.5),
        ((tokens, c), 1.0),
        dtype=dtype,
        seed_key=(tokens, c, "ff_out"),
    )
    y = torch.full((tokens, c), float("nan"), dtype=dtype, device=DEVICE)
    fl.launch_bias_residual(h, w2, b2, r, y)
    ref = fl.linear_bias_residual_reference(h.double(), w2.double(), b2.double(), r.double())
    _assert_close(y, ref, fl.linear_bias_residual_reference(h, w2, b2, r, upcast=False), dtype)
