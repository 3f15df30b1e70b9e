"""Resnet output kernel (shortcut + h + bias) / scale vs a float64 reference, under the Triton interpreter on
CPU (and on CUDA).

Fresh random inputs; the output is poisoned with NaN through `launch(out=...)` before every run, so an
element the kernel fails to write cannot pass.
"""

import importlib

import pytest
import torch

from tests import seeding

ra = importlib.import_module("kernels.bias_residual_add")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> atol. fp32 is compared directly with the float64 reference (rtol 1e-6). For fp16/bf16 the rule is
# max|kernel - ref64| <= 2 * max|torch same-dtype - ref64| + atol.
TOLERANCES = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (B, C, H, W, output_scale_factor): channels are the real ones, spatial sizes scaled down for the
# interpreter except where noted.
SHAPES = [
    (2, 1280, 8, 8, 1.0),  # SD 1.5 deepest level at its real size (512 px, guided batch)
    (2, 1280, 8, 8, 2.0),  # a mid block with mid_block_scale_factor != 1 (the division)
    (2, 320, 12, 10, 1.0),  # first level (SD 1.x, 2.x, SDXL): odd spatial size, the last block masked
    (2, 640, 6, 6, 1.0),  # second level; 640 * 36 * 2 is not a multiple of BLOCK
    (1, 512, 8, 8, 1.0),  # the VAE decoder's resnets (batch 1, 512 channels)
    (1, 3, 5, 7, 1.0),  # a channel count far below anything vectorised
]


def _inputs(b, c, h, w, dtype, channels_last):
    gen = seeding.generator(b, c, h, w, str(dtype), channels_last)
    x, y = (torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, y = (t.to(DEVICE, dtype).contiguous(memory_format=layout) for t in (x, y))
    return x, y, bias.to(DEVICE, dtype)


def _run_poisoned(x, h, bias, scale):
    out = torch.full_like(x, float("nan"))
    ra.launch(x, h, bias, scale, out)
    return out


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("b, c, h, w, scale", SHAPES)
def test_matches_reference_on_sd_shapes(b, c, h, w, scale, dtype, channels_last):
    x, y, bias = _inputs(b, c, h, w, dtype, channels_last)
    out = _run_poisoned(x, y, bias, scale)
    ref = ra.bias_residual_add_reference(x.double(), y.double(), bias.double(), scale)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    atol = TOLERANCES[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-6)
        return
    err = (out.double() - ref).abs().max().item()
    torch_err = (ra.bias_residual_add_reference(x, y, bias, scale, upcast=False).double() - ref).abs().max().item()
    assert err <= 2 * torch_err + atol, f"{dtype}: kernel error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


def test_public_op_keeps_the_layout():
    x, y, bias = _inputs(2, 64, 4, 4, torch.float16, channels_last=True)
    out = ra.bias_residual_add(x, y, bias, 1.0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ra.bias_residual_add_reference(x, y, bias), atol=1e-3, rtol=0)


def test_fake_implementation_gives_the_output_without_running():
    x = torch.empty(2, 320, 64, 64, device="meta", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    out = torch.ops.sd_kernels.bias_residual_add(x, x.clone(), torch.empty(320, device="meta"), 1.0)
    assert out.shape == x.shape and out.stride() == x.stride() and out.device.type == "meta"


_X = torch.zeros(1, 4, 2, 2)


@pytest.mark.parametrize(
    "x, h, bias, scale, error, message",
    [
        (_X, _X.double(), torch.zeros(4), 1.0, TypeError, "h has dtype torch.float64"),
        (_X, torch.zeros(1, 4, 2, 3), torch.zeros(4), 1.0, ValueError, "one shape and dtype"),
        (_X, _X.contiguous(memory_format=torch.channels_last), torch.zeros(4), 1.0, ValueError, "share dense"),
        (_X, _X.clone(), torch.zeros(3), 1.0, ValueError, "bias must be a contiguous \\[4\\]"),
        (_X, _X.clone(), torch.zeros(4), 0.0, ValueError, "output_scale_factor must be a positive"),
    ],
)
def test_bad_inputs_are_named(x, h, bias, scale, error, message):
    with pytest.raises(error, match=message):
        ra.bias_residual_add(x, h, bias, scale)
    assert not ra.supports(x, h, bias) or scale <= 0


def test_launch_rejects_mismatched_output():
    x, y, bias = _inputs(1, 8, 2, 2, torch.float32, channels_last=True)
    with pytest.raises(ValueError, match="out must match"):
        ra.launch(x, y, bias, 1.0, torch.empty(1, 8, 2, 2))
