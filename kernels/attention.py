"""Flash-attention forward for every Stable Diffusion shape: softmax(q k^T * scale) v, not causal, no mask.

Layouts. q, k, v are [B, H, N, D] tensors of any strides; the UNet passes head-split VIEWS of
[B, N, H*D] projection outputs (strides (N*H*D, D, H*D, 1)) and the kernel reads them in place, no
transposing copy. The result is returned as a [B, H, Nq, D] tensor whose memory is laid out as
[B, Nq, H, D] (strides (Nq*H*D, D, H*D, 1)), so the caller's merge-heads
`out.transpose(1, 2).reshape(B, Nq, H*D)` is a free view instead of a copy.

Head dims. Any D from 1 to 256. The head dim is split into at most two power-of-two chunks, a full
one of BLOCK_D0 columns and a masked one of BLOCK_D1 >= 16 columns (tl.dot needs >= 16): 40 -> 32+16,
80 -> 64+16, 160 -> 128+32, 64 -> 64. Rounding 40 up to 64 would waste 37.5% of both matrix
products; the split wastes 17% at D=40 and nothing at 80 or 160. Columns past D are masked in every
load and store; nothing is padded in memory.

Keys. Nk need not equal Nq: full key blocks run unmasked, and a last partial block (all 77 text
tokens fit one block of 128) masks its rows to zero and its scores to -inf.

Numerics. fp16 and bf16 only (fp32 is rejected: use attention_reference). Scores and the softmax
statistics are fp32, the softmax uses exp2 with scale*log2(e) folded into one multiply-add, the
probabilities are cast to the input dtype for the P @ V product (as FlashAttention does), the
accumulator is fp32 and is cast once on store.

`attention` is the torch custom op `sd_kernels::attention` (torch.library.custom_op with a fake
implementation, so torch.compile and export see an opaque op of known output shape and strides,
and CUDA graphs capture it); `attention(..., out=buf)` writes into a preallocated [B, H, Nq, D]
tensor of any strides through `sd_kernels::attention_out`. custom_op rather than triton_op:
triton_op traces into the kernel under fake tensors, which runs the kernel for real under
TRITON_INTERPRET and so breaks fake-tensor tracing on the CPU. Both ops run on CPU tensors under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional  # custom-op schemas: older torch cannot parse `float | None`

import torch
import triton
import triton.language as tl

from kernels import aot

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Key lengths up to this run as a single key block: CLIP's 77 tokens in one masked block of 128.
SHORT_CONTEXT = 128
_LOG2_E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a [rows, cols] tile, masking only the dimensions that can run past the tensor
    (masks that are known-true at compile time are not emitted), zero-filling what is masked."""
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


# Triton's interpreter mishandles bf16 (it stores it as uint16): its tl.dot multiplies the bit
# patterns (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates instead of rounding to
# nearest even. INTERPRET_BF16, set by the launcher only for bf16 tensors off the GPU, routes the
# two operations through the helpers below, which reproduce what the GPU computes: the product of
# bf16 values accumulated in fp32, and round-to-nearest-even casts.


@triton.jit
def _dot(a, b, acc, INTERPRET_BF16: tl.constexpr):
    """acc + a @ b (acc may be None) with fp32 accumulation."""
    if INTERPRET_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """fp32 -> fp16/bf16, rounding to nearest even."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # now exactly representable, so truncation is exact
    return x.to(dtype)


@triton.jit
def _attend_key_block(
    acc0,
    acc1,
    m_i,
    l_i,
    q0,
    q1,
    k_ptrs0,
    k_ptrs1,
    v_ptrs0,
    v_ptrs1,  # pointers to this key block's [BLOCK_N, BLOCK_D*] tiles
    key_mask,
    d0_mask,
    d1_mask,  # [BLOCK_N] keys < Nk; head-dim columns < HEAD_DIM per chunk
    qk_scale,
    BLOCK_D1: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """One step of the online softmax: fold a block of keys into (acc, running max m_i, running sum l_i)."""
    k0 = _load_tile(k_ptrs0, key_mask, d0_mask, MASK_KEYS, MASK_D0)
    s = _dot(q0, tl.trans(k0), None, INTERPRET_BF16)
    if BLOCK_D1 > 0:
        k1 = _load_tile(k_ptrs1, key_mask, d1_mask, MASK_KEYS, MASK_D1)
        s = _dot(q1, tl.trans(k1), s, INTERPRET_BF16)
    if MASK_KEYS:
        s = tl.where(key_mask[None, :], s, float("-inf"))
    # Scores stay unscaled; qk_scale = scale*log2(e) > 0, so max(s)*qk_scale is the scaled max and
    # s*qk_scale - m is a single FMA per score.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_tile(v_ptrs0, key_mask, d0_mask, MASK_KEYS, MASK_D0)
    p = _cast(p, v0.dtype, INTERPRET_BF16)
    acc0 = _dot(p, v0, acc0 * alpha[:, None], INTERPRET_BF16)
    if BLOCK_D1 > 0:
        v1 = _load_tile(v_ptrs1, key_mask, d1_mask, MASK_KEYS, MASK_D1)
        acc1 = _dot(p, v1, acc1 * alpha[:, None], INTERPRET_BF16)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    O,  # pointers to element [0, 0, 0, 0] of the q, k, v, out [B, H, N, D] views
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,  # q strides in elements (batch, head, query, dim)
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,  # k strides in elements (batch, head, key, dim)
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,  # v strides in elements (batch, head, key, dim)
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,  # out strides in elements (batch, head, query, dim)
    H,
    N_Q,
    N_K,  # heads, query length, key length
    qk_scale,  # softmax scale * log2(e), fp32, > 0
    HEAD_DIM: tl.constexpr,  # D; a constant so that the head-dim masks stay vectorisable
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop step
    BLOCK_D0: tl.constexpr,  # first (power-of-two) chunk of the head dim
    BLOCK_D1: tl.constexpr,  # second chunk (power of two >= 16), or 0 when BLOCK_D0 covers D
    VEC: tl.constexpr,  # every batch/head/row stride is a multiple of VEC elements (16-byte loads at 8)
    INTERPRET_BF16: tl.constexpr,  # interpreter-only bf16 emulation, see _dot and _cast
):
    # Grid: (query blocks, B*H). Query blocks of one head are adjacent in launch order, so the
    # head's keys and values are read from L2 by all of them.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    # The multiple_of hints are true by construction of VEC in the launcher; without them a head
    # stride like 40 (unknown divisibility) would turn every load into 2-byte accesses.
    q_base = Q + tl.multiple_of(off_b * stride_qb + off_h * stride_qh, VEC)
    k_base = K + tl.multiple_of(off_b * stride_kb + off_h * stride_kh, VEC)
    v_base = V + tl.multiple_of(off_b * stride_vb + off_h * stride_vh, VEC)
    o_base = O + tl.multiple_of(off_b * stride_ob + off_h * stride_oh, VEC)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    m_mask = offs_m < N_Q
    d0_mask = offs_d0 < HEAD_DIM
    MASK_D0: tl.constexpr = BLOCK_D0 > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D0 + BLOCK_D1 > HEAD_DIM

    q_rows = tl.multiple_of(offs_m * stride_qm, VEC)
    k_rows = tl.multiple_of(offs_n * stride_kn, VEC)
    v_rows = tl.multiple_of(offs_n * stride_vn, VEC)
    q0 = _load_tile(q_base + q_rows[:, None] + offs_d0[None, :] * stride_qd, m_mask, d0_mask, True, MASK_D0)
    k_ptrs0 = k_base + k_rows[:, None] + offs_d0[None, :] * stride_kd
    v_ptrs0 = v_base + v_rows[:, None] + offs_d0[None, :] * stride_vd
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d1_mask = offs_d1 < HEAD_DIM
        q1 = _load_tile(q_base + q_rows[:, None] + offs_d1[None, :] * stride_qd, m_mask, d1_mask, True, MASK_D1)
        k_ptrs1 = k_base + k_rows[:, None] + offs_d1[None, :] * stride_kd
        v_ptrs1 = v_base + v_rows[:, None] + offs_d1[None, :] * stride_vd
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:  # placeholders the helper passes through untouched
        d1_mask = d0_mask
        q1 = q0
        k_ptrs1 = k_ptrs0
        v_ptrs1 = v_ptrs0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Full key blocks: no key mask. Then at most one partial block with the key tail masked.
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _attend_key_block(
            acc0,
            acc1,
            m_i,
            l_i,
            q0,
            q1,
            k_ptrs0 + start_n * stride_kn,
            k_ptrs1 + start_n * stride_kn,
            v_ptrs0 + start_n * stride_vn,
            v_ptrs1 + start_n * stride_vn,
            offs_n < BLOCK_N,
            d0_mask,
            d1_mask,
            qk_scale,
            BLOCK_D1,
            False,
            MASK_D0,
            MASK_D1,
            INTERPRET_BF16,
        )
    if n_full < N_K:
        acc0, acc1, m_i, l_i = _attend_key_block(
            acc0,
            acc1,
            m_i,
            l_i,
            q0,
            q1,
            k_ptrs0 + n_full * stride_kn,
            k_ptrs1 + n_full * stride_kn,
            v_ptrs0 + n_full * stride_vn,
            v_ptrs1 + n_full * stride_vn,
            n_full + offs_n < N_K,
            d0_mask,
            d1_mask,
            qk_scale,
            BLOCK_D1,
            True,
            MASK_D0,
            MASK_D1,
            INTERPRET_BF16,
        )

    inv_l = 1.0 / l_i
    o_rows = tl.multiple_of(offs_m * stride_om, VEC)
    o_ptrs0 = o_base + o_rows[:, None] + offs_d0[None, :] * stride_od
    out0 = _cast(acc0 * inv_l[:, None], O.dtype.element_ty, INTERPRET_BF16)
    if MASK_D0:
        tl.store(o_ptrs0, out0, mask=m_mask[:, None] & d0_mask[None, :])
    else:
        tl.store(o_ptrs0, out0, mask=m_mask[:, None])
    if BLOCK_D1 > 0:
        o_ptrs1 = o_base + o_rows[:, None] + offs_d1[None, :] * stride_od
        out1 = _cast(acc1 * inv_l[:, None], O.dtype.element_ty, INTERPRET_BF16)
        if MASK_D1:
            tl.store(o_ptrs1, out1, mask=m_mask[:, None] & d1_mask[None, :])
        else:
            tl.store(o_ptrs1, out1, mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class AttentionConfig:
    """Compile-time tiling of one launch. See `choose_config` for why each bucket has its values."""

    block_m: int
    block_n: int
    block_d0: int
    block_d1: int
    num_warps: int
    num_stages: int


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): a full power-of-two chunk plus a masked power-of-two remainder chunk,
    each >= 16 as tl.dot requires. 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0)."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    if d1 == d0:  # e.g. 24 -> 16+16: one chunk of 32 is the same work in one product
        d0, d1 = 2 * d0, 0
    return d0, d1


def choose_config(head_dim: int, n_keys: int) -> AttentionConfig:
    """Tiling per head-dim bucket (by the padded width BLOCK_D0 + BLOCK_D1) and context length.

    Eight warps = two Hopper warpgroups, each owning 64 of the 128 query rows (one wgmma m64 tile),
    so per thread the fp32 score tile costs BLOCK_N/4 registers and the accumulator width/4.
    Registers / shared memory below are ptxas's for sm_90 (no spills anywhere; see aot_configs):
      width <= 64  (D=40, 64):   BLOCK_N=128, 3 stages: 170-180 regs, 84-112 KiB. At D=40 the
                                 exp2 and softmax arithmetic, not the MMAs, bound the loop, so
                                 large key blocks amortise the per-block rescale of acc.
      width <= 128 (D=80, 128):  BLOCK_N=64, 3 stages: 126 regs, 80 KiB.
      width <= 160 (D=160):      BLOCK_N=64, 2 stages: 218 regs, 120 KiB (a 64x160 K or V tile
                                 is 20 KiB per stage).
      width <= 256:              BLOCK_N=32, 2 stages: 236 regs; BLOCK_N=64 reaches the 255 cap.
    Short contexts (Nk <= 128, CLIP's 77 tokens), widths <= 128: one masked key block of 128 and
    1 stage. The work there is loading Q and storing O once; with no loop to pipeline, stages
    would only cost shared memory (20-36 KiB instead of 84-140) and so CTAs per SM. At D=160 a
    128-key block needs all 255 registers, so it keeps its long-context tiling.
    """
    d0, d1 = split_head_dim(head_dim)
    width = d0 + d1
    if width <= 64:
        block_n, num_stages = 128, 3
    elif width <= 128:
        block_n, num_stages = 64, 3
    elif width <= 160:
        block_n, num_stages = 64, 2
    else:
        block_n, num_stages = 32, 2
    if n_keys <= SHORT_CONTEXT and width <= 128:
        block_n, num_stages = SHORT_CONTEXT, 1
    return AttentionConfig(block_m=128, block_n=block_n, block_d0=d0, block_d1=d1, num_warps=8, num_stages=num_stages)


def _alignment(*tensors: torch.Tensor) -> int:
    """Largest of 8, 4, 2, 1 dividing every batch/head/row stride: the VEC hint of the kernel."""
    strides = [s for t in tensors for s in t.stride()[:3]]
    for vec in (8, 4, 2):
        if all(s % vec == 0 for s in strides):
            return vec
    return 1


# ----------------------------------------------------------------------------------------------
# Input checks, launcher and custom ops


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"attention: q has dtype {q.dtype}; the kernel supports torch.float16 and "
            f"torch.bfloat16 (use attention_reference for float32)"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    (b, h, _, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if (bk, hk, dk) != (b, h, d) or (bv, hv, dv) != (b, h, d):
        raise ValueError(
            f"attention: batch, heads and head dim must match: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if nk != nv:
        raise ValueError(f"attention: k has {nk} keys but v has {nv} values")
    if nk == 0:
        raise ValueError(f"attention: k and v have no keys (shape {tuple(k.shape)})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {d} is not supported; the kernel handles 1..{MAX_HEAD_DIM}")
    if b * h > 65535:
        raise ValueError(f"attention: batch*heads = {b * h} exceeds the grid limit of 65535")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention: q is on {q.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be a positive finite number, got {scale}")


def _check_out(q: torch.Tensor, out: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"attention: out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"attention: out must be {tuple(q.shape)} {q.dtype} on {q.device} like q, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )


def _check_int32_offsets(*tensors: torch.Tensor) -> None:
    """The kernel computes offsets within one (batch, head) slice in int32."""
    for t in tensors:
        if t.shape[2] * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3)) >= 2**31:
            raise ValueError(
                f"attention: a {tuple(t.shape)} tensor with strides {t.stride()} spans more "
                f"than 2**31 elements within one head; split the sequence"
            )


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """A [B, H, Nq, D] tensor stored as [B, Nq, H, D], so that merging heads is a free view."""
    b, h, n, d = q.shape
    return torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    scale: float | None,
    config: AttentionConfig | None = None,
) -> None:
    """Run the kernel into `out` (checked inputs). `config` overrides choose_config (benchmark sweeps)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if n_q == 0:
        return
    _check_int32_offsets(q, k, v, out)
    cfg = config or choose_config(d, n_k)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (triton.cdiv(n_q, cfg.block_m), b * h)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attention_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            h,
            n_q,
            n_k,
            scale * _LOG2_E,
            HEAD_DIM=d,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D0=cfg.block_d0,
            BLOCK_D1=cfg.block_d1,
            VEC=_alignment(q, k, v, out),
            INTERPRET_BF16=q.dtype == torch.bfloat16 and q.device.type != "cuda",
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


@torch.library.custom_op("sd_kernels::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    out = empty_output(q)
    launch(q, k, v, out, scale)
    return out


@_attention_op.register_fake
def _attention_fake(q, k, v, scale):
    return empty_output(q)


@torch.library.custom_op("sd_kernels::attention_out", mutates_args=("out",))
def _attention_out_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: Optional[float]
) -> None:
    launch(q, k, v, out, scale)


@_attention_out_op.register_fake
def _attention_out_fake(q, k, v, out, scale):
    return None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v with scale defaulting to 1/sqrt(D); not causal, no mask.

    q: [B, H, Nq, D], k and v: [B, H, Nk, D], any strides, fp16 or bf16, D <= 256.
    Returns [B, H, Nq, D] laid out in memory as [B, Nq, H, D] (see the module docstring), or `out`
    (any [B, H, Nq, D] tensor of q's dtype and device) filled in place when given.
    """
    _check_inputs(q, k, v, scale)
    if out is None:
        return torch.ops.sd_kernels.attention(q, k, v, scale)
    _check_out(q, out)
    torch.ops.sd_kernels.attention_out(q, k, v, out, scale)
    return out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, upcast: bool = True
) -> torch.Tensor:
    """Plain-torch attention; with upcast=True the math is fp32 and the result is cast back to q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (probs @ v).to(dtype)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation list (tests/kernels/test_sass.py compiles each entry for sm_90).


def _aot_entry(head_dim: int, n_keys: int, dtype: torch.dtype) -> aot.AotConfig:
    """One configuration, specialised as triton's JIT specialises a UNet call: 16-byte-aligned pointers,
    batch and row strides divisible by 16 (H*D is 320, 640, 1280), head stride D, unit head-dim stride
    (the JIT turns 1 into a constant). H, N_Q and N_K only bound loops and masks."""
    cfg = choose_config(head_dim, n_keys)
    heads, n_q = 8, 4096
    args = dict(Q=dtype, K=dtype, V=dtype, O=dtype, H=heads, N_Q=n_q, N_K=n_keys, qk_scale=1.0)
    for t in "qkvo":
        rows = n_q if t in "qo" else n_keys
        args.update(
            {
                f"stride_{t}b": rows * heads * head_dim,
                f"stride_{t}h": head_dim,
                f"stride_{t}{'m' if t in 'qo' else 'n'}": heads * head_dim,
                f"stride_{t}d": 1,
            }
        )
    tiling = {
        "HEAD_DIM": head_dim,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_D0": cfg.block_d0,
        "BLOCK_D1": cfg.block_d1,
        "VEC": 8,
        "INTERPRET_BF16": False,
    }
    return aot.config(
        _attention_fwd_kernel, args, tiling, cfg.num_warps, cfg.num_stages, count_args=("H", "N_Q", "N_K")
    )


def aot_configs() -> list[aot.AotConfig]:
    """Every tiling choose_config can pick, at the SD head dims (40 / 64 / 80 / 160) and the largest
    (256), for self-attention and for a 77-token context, in fp16 and bf16."""
    return aot.unique(
        [
            _aot_entry(head_dim, n_keys, dtype)
            for dtype in (torch.float16, torch.bfloat16)
            for head_dim in (40, 64, 80, 160, 256)
            for n_keys in ((4096, 77) if choose_config(head_dim, 4096) != choose_config(head_dim, 77) else (4096,))
        ]
    )
