"""kernels.attention against an fp32 reference, at the head dims, head counts and key lengths of SD.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set by tests/conftest.py), so query lengths
are scaled down from 4096 while head dims, head counts and the 77-token context stay real. The
full-size shapes run in the `gpu` tests.
"""

from __future__ import annotations

import inspect
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import (
    _attention_fwd_kernel,
    aot_configs,
    attention,
    attention_reference,
    choose_config,
    split_head_dim,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (dtype, atol, rtol). Rule: |kernel - fp32 reference| <= 2 * max|torch SDPA in the same dtype -
# reference| + atol + rtol * |reference|. The atol covers rounding P to the input dtype before the
# P @ V product (FlashAttention does the same; torch's CPU SDPA keeps P in fp32): half an ulp of
# an output near 1 in fp16, one in bf16.
TOLERANCES = {
    torch.float16: (2**-11, 2**-10),
    torch.bfloat16: (2**-8, 2**-8),
}
DTYPES = list(TOLERANCES)

# (B, H, Nq, Nk, D), layout, each for a reason. "projection": q, k, v are head-split views of
# [B, N, H*D] projection outputs (the UNet's layout); "contiguous": plain [B, H, N, D] tensors.
SHAPES = [
    ((2, 8, 256, 77, 40), "projection"),  # SD1.5 64x64 cross-attn: D=40 (32+16 chunks), 77 keys in one masked block
    ((2, 8, 256, 77, 40), "contiguous"),  # the same with a row stride of 40 (not a multiple of 16)
    ((2, 8, 256, 256, 40), "projection"),  # SD1.5 64x64 self-attention: two full key blocks, no key tail
    ((1, 8, 200, 200, 80), "projection"),  # SD1.5 32x32 self: D=80 (64+16), Nq not a multiple of 128, key tail of 8
    ((1, 8, 200, 200, 80), "contiguous"),  # the same, contiguous
    ((2, 8, 64, 77, 160), "projection"),  # SD1.5 8x8 cross-attention at its real size: D=160 (128+32), key tail
    ((2, 8, 64, 64, 160), "contiguous"),  # SD1.5 8x8 self-attention at its real size: one full key block
    ((1, 5, 300, 77, 64), "projection"),  # SD2.x H=5 D=64 cross-attention, Nq=300 leaves a 44-row query tail
    ((3, 10, 40, 130, 64), "contiguous"),  # SD2.x/SDXL H=10, batch 3: one full key block plus a tail of 2
    ((1, 20, 64, 100, 64), "projection"),  # SD2.x/SDXL H=20, a short context that is not CLIP's 77
    ((1, 1, 100, 150, 24), "contiguous"),  # odd D=24 (one masked chunk of 32), context past the short threshold
    ((1, 2, 129, 77, 72), "projection"),  # odd D=72 (64 + masked 16), one query row past a block
    ((1, 1, 96, 77, 256), "projection"),  # largest D: 32-key blocks, two full ones and a tail of 13
    ((1, 2, 40, 77, 8), "contiguous"),  # tiny D=8 (< 16, so even the first chunk is masked)
    ((1, 1, 70, 90, 136), "projection"),  # D=136 (128 + masked 16) in the D=160 bucket
    ((2, 3, 50, 1, 40), "projection"),  # a single key: softmax is 1, so out == v
]


def _generator(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh data per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, gen, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _qkv(b, h, nq, nk, d, dtype, layout, gen, q_scale=1.0):
    """q, k, v ~ N(0, 1) (q scaled by q_scale), as contiguous [B, H, N, D] tensors or as head-split
    views of [B, N, H*D] projection outputs (strides (N*H*D, D, H*D, 1)), the UNet's layout."""

    def make(n, scale=1.0):
        if layout == "contiguous":
            return _randn((b, h, n, d), gen, dtype, scale)
        return _randn((b, n, h * d), gen, dtype, scale).view(b, n, h, d).transpose(1, 2)

    return make(nq, q_scale), make(nk), make(nk)


def _assert_close(out, q, k, v, scale=None):
    atol, rtol = TOLERANCES[q.dtype]
    ref = _reference_fp32(q, k, v, scale)
    torch_err = (F.scaled_dot_product_attention(q, k, v, scale=scale).float() - ref).abs().max()
    err = (out.float() - ref).abs()
    bound = 2 * torch_err + atol + rtol * ref.abs()
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (an unwritten or poisoned element?)"
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3e} (torch SDPA {torch_err.item():.3e}, atol {atol:.1e}); "
        f"worst at flat index {worst.item()}: kernel {out.flatten()[worst].item()} vs {ref.flatten()[worst].item()}"
    )


def _reference_fp32(q, k, v, scale):
    """The reference in fp32, not cast back: the yardstick for both the kernel and torch."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return probs @ v.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else s)
def test_matches_reference_into_poisoned_out(shape, dtype, layout):
    b, h, nq, nk, d = shape
    q, k, v = _qkv(*shape, dtype, layout, _generator(shape, dtype, layout))
    out = torch.full((b, nq, h, d), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    result = attention(q, k, v, out=out)
    assert result is out
    _assert_close(out, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_returns_heads_merged_layout(dtype):
    # The returned [B, H, Nq, D] tensor is stored as [B, Nq, H, D]: merging heads is a free view.
    shape = (2, 8, 130, 77, 40)
    q, k, v = _qkv(*shape, dtype, "projection", _generator("layout", dtype))
    out = attention(q, k, v)
    b, h, nq, _, d = shape
    assert out.shape == (b, h, nq, d) and out.dtype == dtype
    assert out.stride() == (nq * h * d, d, h * d, 1)
    assert out.transpose(1, 2).reshape(b, nq, h * d).data_ptr() == out.data_ptr()
    _assert_close(out, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peaky_softmax_and_explicit_scale(dtype):
    # q ~ N(0, 4^2) makes scores of std ~4: the running max moves between key blocks, which tests
    # the online rescaling; an explicit scale replaces 1/sqrt(D).
    shape = (1, 4, 150, 300, 40)
    q, k, v = _qkv(*shape, dtype, "projection", _generator("peaky", dtype), q_scale=4.0)
    for scale in (None, 0.3):
        _assert_close(attention(q, k, v, scale=scale), q, k, v, scale=scale)


def test_writes_nothing_outside_out():
    # out is a window into a larger NaN buffer: rows past Nq and columns past D must stay untouched.
    b, h, nq, nk, d = 1, 3, 70, 77, 40
    q, k, v = _qkv(b, h, nq, nk, d, torch.float16, "contiguous", _generator("window"))
    big = torch.full((b, h, nq + 9, d + 24), float("nan"), dtype=torch.float16, device=DEVICE)
    attention(q, k, v, out=big[:, :, :nq, :d])
    _assert_close(big[:, :, :nq, :d], q, k, v)
    assert big[:, :, nq:].isnan().all() and big[:, :, :, d:].isnan().all()


def test_any_strides_including_head_dim():
    # Inputs with a head-dim stride of 2 and permuted batch/head order: the kernel takes all strides.
    b, h, nq, nk, d = 2, 3, 65, 77, 40
    gen = _generator("strides")
    q = _randn((h, b, nq, 2 * d), gen, torch.float16)[..., ::2].transpose(0, 1)
    k = _randn((b, h, nk, 2 * d), gen, torch.float16)[..., 1::2]
    v = _randn((nk, b, h, d), gen, torch.float16).permute(1, 2, 0, 3)
    assert q.stride(3) == 2 and k.stride(3) == 2
    _assert_close(attention(q, k, v), q, k, v)


def test_single_key_returns_value():
    q, k, v = _qkv(2, 3, 50, 1, 40, torch.float16, "contiguous", _generator("single"))
    torch.testing.assert_close(attention(q, k, v), v.expand(-1, -1, 50, -1), atol=0, rtol=0)


def test_reference_matches_sdpa():
    q, k, v = _qkv(2, 3, 33, 77, 40, torch.float32, "projection", _generator("reference"))
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q16, k16, v16 = q.half(), k.half(), v.half()
    assert attention_reference(q16, k16, v16, upcast=False).dtype == torch.float16


def test_custom_op_registration():
    # Fake (meta) implementation, schema and dispatch checks for the custom op.
    q, k, v = _qkv(1, 2, 40, 77, 40, torch.float16, "projection", _generator("opcheck"))
    torch.library.opcheck(
        torch.ops.sd_kernels.attention.default,
        (q, k, v, None),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    out = torch.full_like(q, float("nan"))
    torch.library.opcheck(
        torch.ops.sd_kernels.attention_out.default, (q, k, v, out, 0.2), test_utils=("test_schema", "test_faketensor")
    )
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = attention(
            torch.empty(2, 8, 4096, 40, dtype=torch.float16),
            torch.empty(2, 8, 77, 40, dtype=torch.float16),
            torch.empty(2, 8, 77, 40, dtype=torch.float16),
        )
    assert fake.shape == (2, 8, 4096, 40) and fake.stride() == (4096 * 320, 40, 320, 1)


def test_custom_op_under_torch_compile_and_export():
    # The op is opaque to dynamo and export: one graph with no break, the kernel runs inside it.
    q, k, v = _qkv(1, 2, 40, 77, 40, torch.float16, "projection", _generator("compile"))

    class Core(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v) * 2

    compiled = torch.compile(Core(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), Core()(q, k, v), atol=0, rtol=0)
    exported = torch.export.export(Core(), (q, k, v))
    assert any(node.target is torch.ops.sd_kernels.attention.default for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(q, k, v), Core()(q, k, v), atol=0, rtol=0)


# ---- bad input: a clear message naming what is wrong ----

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
Q = ((1, 1, 4, 40), F16)  # a valid q (and k, v) spec: (shape, dtype)


@pytest.mark.parametrize(
    "q, k, v, kwargs, match",
    [
        (((8, 64, 40), F16), Q, Q, {}, r"q must be 4-D"),
        (
            ((2, 8, 64, 40), F16),
            ((2, 4, 77, 40), F16),
            ((2, 4, 77, 40), F16),
            {},
            r"batch, heads and head dim must match",
        ),
        (
            ((2, 8, 64, 40), F16),
            ((2, 8, 77, 40), F16),
            ((2, 8, 77, 64), F16),
            {},
            r"batch, heads and head dim must match",
        ),
        (
            ((1, 8, 64, 40), F16),
            ((2, 8, 77, 40), F16),
            ((2, 8, 77, 40), F16),
            {},
            r"batch, heads and head dim must match",
        ),
        (((2, 8, 64, 40), F16), ((2, 8, 77, 40), F16), ((2, 8, 76, 40), F16), {}, r"k has 77 keys but v has 76"),
        (((1, 1, 4, 320), F16),) * 3 + ({}, r"head dim 320 is not supported"),
        (Q, ((1, 1, 4, 40), BF16), Q, {}, r"k has dtype torch.bfloat16 but q has torch.float16"),
        (((1, 1, 4, 40), F32),) * 3 + ({}, r"supports torch.float16 and torch.bfloat16"),
        (Q, ((1, 1, 0, 40), F16), ((1, 1, 0, 40), F16), {}, r"no keys"),
        (Q, Q, Q, {"scale": -1.0}, r"scale must be a positive finite number"),
        (Q, Q, Q, {"out": ((1, 1, 4, 41), F16)}, r"out must be \(1, 1, 4, 40\)"),
        (Q, Q, Q, {"out": ((1, 1, 4, 40), BF16)}, r"out must be"),
    ],
    ids=[
        "rank",
        "heads",
        "head-dim",
        "batch",
        "nk",
        "D>256",
        "dtype-mismatch",
        "fp32",
        "empty-keys",
        "scale",
        "out-shape",
        "out-dtype",
    ],
)
def test_bad_input_is_rejected_clearly(q, k, v, kwargs, match):
    make = lambda spec: torch.randn(spec[0]).to(dtype=spec[1], device=DEVICE)
    kwargs = {name: make(val) if name == "out" else val for name, val in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        attention(make(q), make(k), make(v), **kwargs)


def test_batch_times_heads_past_the_grid_limit_rejected():
    x = torch.randn(1, 65536, 1, 16).to(dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="batch\\*heads = 65536 exceeds the grid limit of 65535"):
        attention(x, x, x)


def test_cpu_tensor_without_interpreter_rejected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 1, 4, 16).half()
    with pytest.raises(ValueError, match=r"q is on cpu; the kernel runs on CUDA.*TRITON_INTERPRET=1"):
        attention(x, x, x)


def test_integer_dtype_rejected():
    x = torch.ones(1, 1, 4, 16, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="q has dtype torch.int32"):
        attention(x, x, x)


# ---- launch configuration ----


@pytest.mark.parametrize(
    "head_dim, chunks",
    [
        (40, (32, 16)),
        (80, (64, 16)),
        (160, (128, 32)),
        (64, (64, 0)),
        (24, (32, 0)),
        (8, (16, 0)),
        (72, (64, 16)),
        (200, (256, 0)),
        (256, (256, 0)),
        (1, (16, 0)),
    ],
)
def test_split_head_dim(head_dim, chunks):
    assert split_head_dim(head_dim) == chunks


def test_aot_configs_cover_sd_head_dims():
    # Every tiling the launcher picks for the SD head dims, self-attention and a 77-token context,
    # fp16 and bf16, is in aot_configs(), with a signature that names the kernel's arguments in order.
    arg_names = list(inspect.signature(_attention_fwd_kernel.fn).parameters)
    listed = set()
    for fn, signature, constexprs, num_warps, num_stages in aot_configs():
        assert fn is _attention_fwd_kernel and list(signature) == arg_names
        assert {n for n, t in signature.items() if t == "constexpr"} == set(constexprs)
        listed.add(
            (
                signature["Q"].split(":")[0],
                constexprs["HEAD_DIM"],
                constexprs["BLOCK_M"],
                constexprs["BLOCK_N"],
                constexprs["BLOCK_D0"],
                constexprs["BLOCK_D1"],
                num_warps,
                num_stages,
            )
        )
    for dtype in ("*fp16", "*bf16"):
        for head_dim in (40, 64, 80, 160):
            for n_keys in (77, 4096):
                c = choose_config(head_dim, n_keys)
                assert (
                    dtype,
                    head_dim,
                    c.block_m,
                    c.block_n,
                    c.block_d0,
                    c.block_d1,
                    c.num_warps,
                    c.num_stages,
                ) in listed


# ---- full-size shapes on the GPU ----


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (2, 8, 4096, 4096, 40),  # SD1.5 64x64 self-attention
        (2, 8, 4096, 77, 40),  # SD1.5 64x64 cross-attention
        (2, 8, 1024, 1024, 80),  # SD1.5 32x32 self-attention
        (2, 8, 256, 77, 160),  # SD1.5 16x16 cross-attention
        (2, 10, 4096, 4096, 64),  # SDXL 64x64 self-attention
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_full_size_on_gpu(shape, dtype):
    b, h, nq, nk, d = shape
    q, k, v = _qkv(*shape, dtype, "projection", _generator("gpu", shape, dtype))
    out = torch.full((b, nq, h, d), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    attention(q, k, v, out=out)
    _assert_close(out, q, k, v)


@gpu
@pytest.mark.gpu
def test_cuda_graph_capture_and_inductor_compile():
    # The custom op replays from a CUDA graph on new inputs and compiles under inductor.
    shape = (2, 8, 4096, 77, 40)  # SD1.5 64x64 cross-attention
    q, k, v = _qkv(*shape, torch.float16, "projection", _generator("graph"))
    first = attention(q, k, v).clone()
    static_out = torch.empty_like(q)
    attention(q, k, v, out=static_out)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention(q, k, v, out=static_out)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(static_out, attention(q, k, v), atol=0, rtol=0)
    assert not torch.equal(static_out, first)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), static_out * 2)
