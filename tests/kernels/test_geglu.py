"""GEGLU kernel vs a float64 reference, under the Triton interpreter on CPU (and on CUDA).

Inputs are fresh random tensors (the gate's spread covers GELU's curved region and both tails); outputs
are poisoned with NaN through `launch(out=...)` before every run, so an element the kernel fails to
write cannot pass.
"""

import importlib

import pytest
import torch

from tests import seeding

gg = importlib.import_module("kernels.geglu")
geglu, geglu_reference, launch = gg.geglu, gg.geglu_reference, gg.launch
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype -> (atol, rtol). fp32 is compared directly with the float64 reference. For fp16/bf16 the rule is
# max|kernel - ref64| <= 2 * max|torch same-dtype - ref64| + atol (rtol unused there).
TOLERANCES = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 0.0),
    torch.bfloat16: (1e-2, 0.0),
}

# (tokens, C): the output width C is the real one; token counts are scaled down (the interpreter runs
# about 50 programs a second) except where noted.
SHAPES = [
    (2 * 8 * 8, 5120),  # SD 1.5 deepest level (8x8 latent tokens, batch 2) at its real size: 4 x 1280
    (2 * 12, 5120),  # SD 2.1 768px deepest level width, a row count that is not a multiple of BLOCK_M
    (37, 2560),  # second level, 4 x 640; odd row count masks the last row block
    (19, 1280),  # first level, 4 x 320 (SD 1.x, 2.x and SDXL all have it)
    (5, 1000),  # a width that is not a multiple of the column block: masked columns
    (3, 96),  # a width below the column block (tiny test models: 4 x 24)
]


def _random_input(rows, width, dtype, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else seeding.derived_seed(rows, width, str(dtype)))
    return (torch.randn(rows, 2 * width, generator=gen, dtype=torch.float64) * 2).to(dtype).to(DEVICE)


def _run_poisoned(x):
    out = torch.full((x.shape[0], x.shape[1] // 2), float("nan"), dtype=x.dtype, device=x.device)
    launch(x, out)
    return out


def _truncate_to_bf16(t):
    """fp64 -> bf16 by dropping the low 16 bits of the fp32 value, as the interpreter casts."""
    bits = t.float().view(torch.int32) & -65536  # 0xFFFF0000
    return bits.view(torch.float32).double()


def _assert_close_to_reference(x, y):
    ref = geglu_reference(x.double())
    assert torch.isfinite(y).all(), "kernel left unwritten (NaN) or non-finite outputs"
    atol, rtol = TOLERANCES[x.dtype]
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
        return
    err = (y.double() - ref).abs().max().item()
    torch_err = (geglu_reference(x, upcast=False).double() - ref).abs().max().item()
    if x.dtype == torch.bfloat16 and y.device.type == "cpu":
        # The interpreter truncates fp32 -> bf16 on store where a GPU rounds to nearest (see test_group_norm).
        torch_err = max(torch_err, (_truncate_to_bf16(ref) - ref).abs().max().item())
    assert err <= 2 * torch_err + atol, f"{x.dtype}: kernel error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol}"


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows, width", SHAPES)
def test_matches_reference_on_sd_shapes(rows, width, dtype):
    if rows * width > 300_000 and dtype != torch.float16 and DEVICE == "cpu":
        pytest.skip("the full-size shape runs once, in fp16, under the interpreter")
    x = _random_input(rows, width, dtype)
    _assert_close_to_reference(x, _run_poisoned(x))


def test_public_op_keeps_leading_dims_and_reads_strided_rows():
    # [B, N, 2C] as nn.Linear returns it, and a row-strided view (every other token) the launcher reads in place.
    x = _random_input(2 * 9, 256, torch.float16).view(2, 9, 512)
    y = geglu(x)
    assert y.shape == (2, 9, 256) and y.is_contiguous()
    _assert_close_to_reference(x.view(18, 512), y.view(18, 256))
    strided = x[:, ::2]
    _assert_close_to_reference(strided.reshape(-1, 512), geglu(strided).reshape(-1, 256))


def test_fake_implementation_gives_the_output_shape_without_running():
    x = torch.empty(2, 4096, 2560, dtype=torch.float16, device="meta")
    y = torch.ops.sd_kernels.geglu(x)
    assert y.shape == (2, 4096, 1280) and y.dtype == torch.float16 and y.device.type == "meta"


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.zeros(4, 7, dtype=torch.float16), ValueError, "must be even"),
        (torch.zeros(4, 0, dtype=torch.float16), ValueError, "must be even and non-zero"),
        (torch.zeros(4, 8, dtype=torch.float64), TypeError, "dtype torch.float64"),
        ([1.0, 2.0], TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_are_named(x, error, message):
    with pytest.raises(error, match=message):
        geglu(x)


def test_launch_rejects_mismatched_output():
    x = _random_input(4, 64, torch.float16)
    with pytest.raises(ValueError, match=r"x must be \[4, 256\]"):
        launch(x, torch.empty(4, 128, dtype=torch.float16, device=DEVICE))
