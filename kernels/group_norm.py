"""GroupNorm with an optional fused SiLU: Triton kernels, a launcher and a pure-torch reference.

Design (forward only, inference). `plan` picks one of four paths; the first two are one launch:
- One-pass (`_group_norm_one_pass_kernel`): a whole group in registers, read once (ONE_PASS_MAX_LANES).
- Looped (`_group_norm_looped_kernel`): one program per (batch, group) sweeps its group twice in the
  split kernels' tiles: statistics (as the stats kernel below: two-pass per tile, Chan's merge), then
  normalise and store; the second read mostly hits L2 on a GPU. Groups up to LOOPED_MAX_GROUP_ELEMENTS.
- The split kernels for larger groups: two kernels per call, statistics then normalisation, in one of
  two tilings chosen by the memory format, described next.

Per-group tiles (NCHW, and channels_last groups wider than CHANNELS_LAST_MAX_WIDTH channels):
- The input is viewed as [B, C, P] with P = H*W, through its strides; the output is written through
  its own strides (`torch.empty_like` keeps the input's memory format).
- A group is a [Cg, P] slab (Cg = C / G) cut into tiles of [BLOCK_HW, BLOCK_C] elements, the long side
  along P, the contiguous axis in NCHW.
- Pass 1, `_group_norm_stats_kernel`, grid (B*G, SPLIT): at batch 2 the 32 groups of SD give only 64
  (batch, group) pairs, too few for a 132-SM H100, so each group is split into SPLIT chunks of whole
  tiles. Each program writes (count, mean, M2) of its chunk: per tile a two-pass mean/M2 in registers,
  merged across tiles with Chan's formula, so the variance never goes through E[x^2] - E[x]^2.
- Pass 2, `_group_norm_apply_kernel`, grid (B*G, P tiles, channel tiles), one tile per program: it
  first merges its group's SPLIT partials (at most MAX_SPLIT * 3 floats, from L2: cheaper than a third
  launch), folds mean, rstd, weight and bias into a per-channel scale and shift, then writes
  y = x * scale + shift (then y * sigmoid(y)).

Chunked channels_last tiles (`_group_norm_cl_*`): in NHWC a group's Cg channels are a short run
(20 bytes at Cg = 10 in fp16, not 16-byte aligned), so per-group tiles load element by element. Instead
a tile is [BLOCK_HW positions, a chunk of whole groups]: the chunk is a contiguous run of each
position's channel row, its width kept a multiple of 8 channels so every run starts 16-byte aligned
and loads 128 bits per lane (`_channel_chunking`). The same two passes, reshaped:
- Pass 1, grid (B * chunks, SPLIT): per-column mean/M2 over the program's positions (two-pass per
  tile, Chan merges across tiles), then one segmented reduction of columns into groups through a
  [BLOCK_C, BLOCK_G] one-hot matrix (Cg is rarely a power of two, so the tile cannot be reshaped into
  groups); partials [B*G, 3, SPLIT].
- Pass 2, grid (B * chunks, position tiles): merges its chunk's groups' partials, spreads mean and rstd
  back to columns through the same one-hot matrix, and normalises the tile with vector loads/stores.

Memory traffic is the minimum for a two-kernel design: read x, read x again, write y. The second read
mostly hits L2 (50 MB on H100; the largest UNet GroupNorm input is 2*320*64*64*2 B = 5 MB at SD1.5
batch 2), so the cost approaches one read plus one write.

Registered as the torch custom ops `sd_kernels::group_norm` (functional) and `sd_kernels::group_norm_out`
(writes into `out`), with fake implementations, so the kernels survive CUDA-graph capture,
torch.compile and torch.export. `torch.library.custom_op` is used rather than `triton_op` because
`wrap_triton` does not accept the interpreter's kernels, and CPU tests run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import aot

ACTIVATIONS = (None, "silu")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per tile. 4096 fp16 = 8 KB per program in flight, 32 elements per thread at 4 warps:
# enough bytes in flight per SM to cover HBM latency without spilling registers (see test_sass).
MAX_TILE = 4096
# Upper bound on chunks per group: keeps the partial-merge in pass 2 (SPLIT * 12 bytes per program)
# small next to the 8 KB tile each program streams; pass 2 always reads MAX_SPLIT masked slots, so the
# split never causes a recompile.
MAX_SPLIT = 64
# Programs of pass 1 to aim for, per SM: several resident programs per SM keep loads in flight.
STATS_PROGRAMS_PER_SM = 8
# Cost of one extra program, in tile lanes, when choosing a channel block (launch, partial merge, tail).
PROGRAM_OVERHEAD_ELEMENTS = 1024
# channels_last tiles: a chunk of whole groups in a power-of-two width of lanes between these bounds.
# 64 lanes = 128 bytes of fp16 per position, a whole cache line (at 32 lanes ptxas spilled the bf16
# apply kernel of the VAE's Cg = 16); a group wider than the maximum takes `choose_config`'s tiles.
CHANNELS_LAST_MIN_WIDTH = 64
CHANNELS_LAST_MAX_WIDTH = 512
# Chunk widths are kept multiples of this many channels: 16 bytes in fp16/bf16, one 128-bit load.
CHUNK_ALIGN = 8
# Upper bound on BLOCK_G * SPLIT, the partials one channels_last apply program merges (x3 floats).
MERGE_LANES = 2048
# Fewest group slots in a channels_last program: with 2, ptxas of triton 3.6 spilled the fp16 apply
# kernel of Cg = 60 (2 groups per chunk) through a small stack frame; 4 compiles clean in 3.6 and 3.8.
MIN_BLOCK_G = 4
# Partials per group that a channels_last apply program merges per loop step.
MERGE_BLOCK = 16
# SM count assumed when not on CUDA (interpreter tests): the H100's, so the split path is exercised.
DEFAULT_SM_COUNT = 132
# One-pass kernel (a whole group in registers, one launch): the most tile lanes (next_pow2(H*W) x
# next_pow2(Cg)) a program holds, and the lanes per thread that set its warps. Measured with ptxas for
# sm_90 (triton 3.8): 16384 lanes at 16 warps take 63 registers in NCHW and 115-127 in channels_last
# (a 64-bit address per lane), no spills; 32768 lanes spill in channels_last at 16 warps (128-register
# cap) and at 32 warps (64-register cap). So SD 1.5's groups at 8x8 and 16x16 (Cg <= 64) take it.
# Lanes per thread: 16, at most 16 warps. At 32 lanes per thread, 4096 lanes (4 warps) spilled under triton
# 3.8 in channels_last bf16 with a shift (2 LDL/STL).
ONE_PASS_MAX_LANES = 16384
ONE_PASS_LANES_PER_THREAD = 16
ONE_PASS_MAX_WARPS = 16
# Looped kernel (one program per (batch, group) sweeping its group in tiles twice, one launch): the
# largest group, in elements (Cg * H * W), it takes; larger groups take the split kernels, whose many
# programs per group fill the chip. 2**21 covers every GroupNorm of the SD 1.5 / 2.1 / SDXL UNets and
# the VAE decoder at 512x512 (its largest group: Cg 8 x 512 x 512 = 2**21). A modelled choice (the census
# counts the saved launch, not the idle SMs of B * G programs, 64 at the guided batch): the GPU check,
# benchmarks/bench_group_norm.py's looped_ms against split_kernels_ms, must confirm it; setting it to 0
# restores the split kernels everywhere the one-pass kernel does not serve.
LOOPED_MAX_GROUP_ELEMENTS = 2**21
# CUDA's limit on grid axes 1 and 2. The apply kernels' axis 1 counts spatial tiles (H*W / 64 for the
# VAE's channels_last tiles: over the limit past 4.19M positions, a 2048x2048 decode), so a launch covers
# at most this many tiles and the rest go to further launches on an offset view.
MAX_GRID_Y = 65535


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,  # *T input, logical [B, C, P]: element (b, c, p) at b*stride_xb + c*stride_xc + p*stride_xp
    partial_ptr,  # *fp32 output, [B*G, SPLIT, 3]: (count, mean, M2) of each chunk of each group
    s_ptr,  # *T shift, logical [B, C]: element (b, c) at b*stride_sb + c*stride_sc; unused without HAS_SHIFT
    stride_xb,  # x: elements between consecutive batch items
    stride_xc,  # x: elements between consecutive channels (1 for channels_last)
    stride_xp,  # x: elements between consecutive spatial positions h*W+w (1 for NCHW-contiguous)
    stride_sb,  # shift: elements between consecutive batch items (0 for a [1, C] or broadcast shift)
    stride_sc,  # shift: elements between consecutive channels
    CG,  # channels per group
    HW,  # spatial positions per channel, H*W
    G,  # number of groups
    NUM_C_TILES,  # channel tiles per group, cdiv(CG, BLOCK_C)
    NUM_TILES,  # tiles per group, NUM_C_TILES * cdiv(HW, BLOCK_HW)
    TILES_PER_PROG,  # consecutive tiles reduced by one program
    SPLIT,  # programs per group (grid axis 1)
    BLOCK_HW: tl.constexpr,  # tile extent along spatial positions (power of two)
    BLOCK_C: tl.constexpr,  # tile extent along channels (power of two)
    HAS_SHIFT: tl.constexpr,  # add shift[b, c] to x before the statistics
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    batch = pid_bg // G
    group = pid_bg % G
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + (group * CG).to(tl.int64) * stride_xc
    s_row = s_ptr + batch * stride_sb + group * CG * stride_sc
    offs_p = tl.arange(0, BLOCK_HW)
    offs_c = tl.arange(0, BLOCK_C)

    count = 0.0
    mean = 0.0
    m2 = 0.0
    for i in range(TILES_PER_PROG):
        tile = pid_s * TILES_PER_PROG + i  # may run past NUM_TILES in the last chunk: then empty
        tile_p = tile // NUM_C_TILES
        tile_c = tile % NUM_C_TILES
        pos = tile_p * BLOCK_HW + offs_p
        chan = tile_c * BLOCK_C + offs_c
        mask = ((pos < HW)[:, None] & (chan < CG)[None, :]) & (tile < NUM_TILES)
        x = tl.load(x_base + pos[:, None] * stride_xp + chan[None, :] * stride_xc, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_SHIFT:
            s_chan = tl.load(s_row + chan * stride_sc, mask=chan < CG, other=0.0).to(tl.float32)
            x = tl.where(mask, x + s_chan[None, :], 0.0)  # masked lanes stay 0 for the sums
        rows = tl.minimum(tl.maximum(HW - tile_p * BLOCK_HW, 0), BLOCK_HW)
        cols = tl.minimum(tl.maximum(CG - tile_c * BLOCK_C, 0), BLOCK_C)
        tile_count = tl.where(tile < NUM_TILES, rows * cols, 0).to(tl.float32)
        # Two-pass statistics of the tile, held in registers: sound even when |mean| >> std.
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(tile_count, 1.0)
        centred = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        # Chan et al. merge of (count, mean, m2) with the tile's.
        new_count = count + tile_count
        delta = tile_mean - mean
        weight = tile_count / tl.maximum(new_count, 1.0)
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * count * weight
        count = new_count

    out = partial_ptr + (pid_bg * SPLIT + pid_s) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr,  # *T input, logical [B, C, P], addressed through the x strides below
    y_ptr,  # *T output, logical [B, C, P], addressed through the y strides below
    w_ptr,  # *fp32|fp16|bf16 weight [C], contiguous; unused when HAS_WEIGHT is False
    b_ptr,  # *fp32|fp16|bf16 bias [C], contiguous; unused when HAS_BIAS is False
    partial_ptr,  # *fp32 [B*G, SPLIT, 3]: (count, mean, M2) per chunk, written by the stats kernel
    s_ptr,  # *T shift, logical [B, C]: element (b, c) at b*stride_sb + c*stride_sc; unused without HAS_SHIFT
    stride_xb,  # x: elements between consecutive batch items
    stride_xc,  # x: elements between consecutive channels
    stride_xp,  # x: elements between consecutive spatial positions h*W+w
    stride_yb,  # y: elements between consecutive batch items
    stride_yc,  # y: elements between consecutive channels
    stride_yp,  # y: elements between consecutive spatial positions
    stride_sb,  # shift: elements between consecutive batch items (0 for a [1, C] or broadcast shift)
    stride_sc,  # shift: elements between consecutive channels
    CG,  # channels per group
    HW,  # spatial positions per channel, H*W
    G,  # number of groups
    SPLIT,  # chunks per group in partial_ptr
    eps,  # added to the variance before the reciprocal square root
    BLOCK_HW: tl.constexpr,  # tile extent along spatial positions (power of two)
    BLOCK_C: tl.constexpr,  # tile extent along channels (power of two)
    MAX_SPLIT: tl.constexpr,  # power of two >= SPLIT: one compiled variant serves every split
    HAS_WEIGHT: tl.constexpr,  # multiply by weight[c]
    HAS_BIAS: tl.constexpr,  # add bias[c]
    HAS_SHIFT: tl.constexpr,  # add shift[b, c] to x before the statistics
    APPLY_SILU: tl.constexpr,  # y = y * sigmoid(y) after the affine
):
    pid_bg = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_c = tl.program_id(2)
    batch = pid_bg // G
    group = pid_bg % G

    # Merge the group's partial statistics: weighted mean of means, then the exact parallel M2.
    split = tl.arange(0, MAX_SPLIT)
    split_mask = split < SPLIT
    partial = partial_ptr + pid_bg * SPLIT * 3 + split * 3
    counts = tl.load(partial, mask=split_mask, other=0.0)
    means = tl.load(partial + 1, mask=split_mask, other=0.0)
    m2s = tl.load(partial + 2, mask=split_mask, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    spread = means - mean
    m2 = tl.sum(m2s + counts * spread * spread, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    # Fold normalisation, the input shift and the affine into one multiply-add per element:
    # ((x + s) - mean) * scale + bias = x * scale + (s - mean) * scale + bias.
    chan = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_mask = chan < CG
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    centre = tl.zeros([BLOCK_C], dtype=tl.float32) - mean
    if HAS_SHIFT:
        s_chan = tl.load(s_ptr + batch * stride_sb + (group * CG + chan) * stride_sc, mask=chan_mask, other=0.0)
        centre += s_chan.to(tl.float32)
    offset = centre * scale
    if HAS_BIAS:
        offset += tl.load(b_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32)

    pos = pid_p * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (pos < HW)[:, None] & chan_mask[None, :]
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + (group * CG).to(tl.int64) * stride_xc
    x = tl.load(x_base + pos[:, None] * stride_xp + chan[None, :] * stride_xc, mask=mask, other=0.0)
    y = x.to(tl.float32) * scale[None, :] + offset[None, :]
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    y_base = y_ptr + batch.to(tl.int64) * stride_yb + (group * CG).to(tl.int64) * stride_yc
    tl.store(y_base + pos[:, None] * stride_yp + chan[None, :] * stride_yc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_cl_stats_kernel(
    x_ptr,  # *T input, channels_last: element (b, c, p) at b*stride_xb + p*stride_xp + c (channel stride 1)
    partial_ptr,  # *fp32 output, [B*G, 3, SPLIT]: count, mean and M2 of each group in each spatial chunk
    s_ptr,  # *T shift, logical [B, C]: element (b, c) at b*stride_sb + c*stride_sc; unused without HAS_SHIFT
    stride_xb,  # x: elements between consecutive batch items
    stride_xp,  # x: elements between consecutive spatial positions h*W+w (>= C)
    stride_sb,  # shift: elements between consecutive batch items (0 for a [1, C] or broadcast shift)
    stride_sc,  # shift: elements between consecutive channels
    C,  # channels
    HW,  # spatial positions, H*W
    G,  # number of groups
    NUM_CHUNKS,  # channel chunks per batch item, cdiv(G, GROUPS_PER_CHUNK)
    TILES_PER_PROG,  # consecutive spatial tiles reduced by one program
    SPLIT,  # programs per (batch, channel chunk) (grid axis 1)
    CG: tl.constexpr,  # channels per group
    GROUPS_PER_CHUNK: tl.constexpr,  # whole groups in one channel chunk; the chunk is CG*GROUPS_PER_CHUNK wide
    BLOCK_HW: tl.constexpr,  # tile extent along spatial positions (power of two)
    BLOCK_C: tl.constexpr,  # tile extent along channels (power of two >= CG*GROUPS_PER_CHUNK)
    BLOCK_G: tl.constexpr,  # power of two >= GROUPS_PER_CHUNK
    HAS_SHIFT: tl.constexpr,  # add shift[b, c] to x before the statistics
):
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    batch = pid_bk // NUM_CHUNKS
    chunk = pid_bk % NUM_CHUNKS
    # CHUNK_C is a multiple of 8 whenever choose_channels_last_config could make it one: Triton then proves
    # 16-byte alignment of every row's run and the (cols < CHUNK_C) mask, and loads 128 bits per lane.
    CHUNK_C: tl.constexpr = CG * GROUPS_PER_CHUNK
    c0 = chunk * CHUNK_C
    cols = tl.arange(0, BLOCK_C)
    col_mask = (cols < CHUNK_C) & (c0 + cols < C)
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + c0
    offs_p = tl.arange(0, BLOCK_HW)
    if HAS_SHIFT:
        s_cols = tl.load(s_ptr + batch * stride_sb + (c0 + cols) * stride_sc, mask=col_mask, other=0.0)
        s_cols = s_cols.to(tl.float32)

    # Per-column running statistics over this program's rows; every column has seen the same `count`.
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TILES_PER_PROG):
        first = (pid_s * TILES_PER_PROG + i) * BLOCK_HW  # may lie past HW in the last chunk: then empty
        pos = first + offs_p
        mask = (pos < HW)[:, None] & col_mask[None, :]
        x = tl.load(x_base + pos[:, None] * stride_xp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x = tl.where(mask, x + s_cols[None, :], 0.0)  # masked lanes stay 0 for the sums
        rows = tl.minimum(tl.maximum(HW - first, 0), BLOCK_HW).to(tl.float32)
        # Two-pass column statistics of the tile, then Chan's merge: never E[x^2] - E[x]^2.
        tile_mean = tl.sum(x, axis=0) / tl.maximum(rows, 1.0)
        centred = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        new_count = count + rows
        weight = rows / tl.maximum(new_count, 1.0)
        delta = tile_mean - mean
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * count * weight
        count = new_count

    # Columns -> groups, once per program: a segmented reduction through a [BLOCK_C, BLOCK_G] one-hot
    # matrix (CG need not be a power of two, so the tile cannot be reshaped into groups). Columns have
    # equal counts, so the group mean is the plain mean of column means and Chan's merge is exact.
    slot = tl.arange(0, BLOCK_G)
    member = ((cols // CG)[:, None] == slot[None, :]) & col_mask[:, None]
    group_mean = tl.sum(tl.where(member, mean[:, None], 0.0), axis=0) / CG
    spread = tl.where(member, mean[:, None] - group_mean[None, :], 0.0)
    group_m2 = tl.sum(tl.where(member, m2[:, None], 0.0) + count * spread * spread, axis=0)
    group = chunk * GROUPS_PER_CHUNK + slot
    group_mask = (slot < GROUPS_PER_CHUNK) & (group < G)
    out = partial_ptr + (batch * G + group) * 3 * SPLIT + pid_s
    tl.store(out, tl.zeros([BLOCK_G], dtype=tl.float32) + count * CG, mask=group_mask)
    tl.store(out + SPLIT, group_mean, mask=group_mask)
    tl.store(out + 2 * SPLIT, group_m2, mask=group_mask)


@triton.jit
def _group_norm_cl_apply_kernel(
    x_ptr,  # *T input, channels_last, addressed as in the stats kernel
    y_ptr,  # *T output, channel stride 1: element (b, c, p) at b*stride_yb + p*stride_yp + c
    w_ptr,  # *fp32|fp16|bf16 weight [C], contiguous; unused when HAS_WEIGHT is False
    b_ptr,  # *fp32|fp16|bf16 bias [C], contiguous; unused when HAS_BIAS is False
    partial_ptr,  # *fp32 [B*G, 3, SPLIT]: count, mean, M2 per group and spatial chunk (stats kernel)
    s_ptr,  # *T shift, logical [B, C]: element (b, c) at b*stride_sb + c*stride_sc; unused without HAS_SHIFT
    stride_xb,  # x: elements between consecutive batch items
    stride_xp,  # x: elements between consecutive spatial positions
    stride_yb,  # y: elements between consecutive batch items
    stride_yp,  # y: elements between consecutive spatial positions
    stride_sb,  # shift: elements between consecutive batch items (0 for a [1, C] or broadcast shift)
    stride_sc,  # shift: elements between consecutive channels
    C,  # channels
    HW,  # spatial positions, H*W
    G,  # number of groups
    NUM_CHUNKS,  # channel chunks per batch item
    SPLIT,  # spatial chunks in partial_ptr
    eps,  # added to the variance before the reciprocal square root
    CG: tl.constexpr,  # channels per group
    GROUPS_PER_CHUNK: tl.constexpr,  # whole groups in one channel chunk
    BLOCK_HW: tl.constexpr,  # tile extent along spatial positions (power of two)
    BLOCK_C: tl.constexpr,  # tile extent along channels (power of two >= CG*GROUPS_PER_CHUNK)
    BLOCK_G: tl.constexpr,  # power of two >= GROUPS_PER_CHUNK
    MERGE_BLOCK: tl.constexpr,  # partials per group merged per loop step (power of two)
    HAS_WEIGHT: tl.constexpr,  # multiply by weight[c]
    HAS_BIAS: tl.constexpr,  # add bias[c]
    HAS_SHIFT: tl.constexpr,  # add shift[b, c] to x before the statistics
    APPLY_SILU: tl.constexpr,  # y = y * sigmoid(y) after the affine
):
    pid_bk = tl.program_id(0)
    pid_p = tl.program_id(1)
    batch = pid_bk // NUM_CHUNKS
    chunk = pid_bk % NUM_CHUNKS
    CHUNK_C: tl.constexpr = CG * GROUPS_PER_CHUNK
    c0 = chunk * CHUNK_C
    cols = tl.arange(0, BLOCK_C)
    col_mask = (cols < CHUNK_C) & (c0 + cols < C)
    pos = pid_p * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (pos < HW)[:, None] & col_mask[None, :]
    # The tile's load is issued first, so its latency overlaps the merge below.
    x = tl.load(
        x_ptr + batch.to(tl.int64) * stride_xb + c0 + pos[:, None] * stride_xp + cols[None, :], mask=mask, other=0.0
    )

    # Merge the chunk's groups' partials (L1/L2 hits: every tile of the batch item reads the same ones),
    # MERGE_BLOCK chunks at a time so registers stay bounded whatever SPLIT: within a chunk the weighted
    # mean of means and the exact parallel M2, across chunks Chan's merge.
    slot = tl.arange(0, BLOCK_G)
    group = chunk * GROUPS_PER_CHUNK + slot
    group_mask = (slot < GROUPS_PER_CHUNK) & (group < G)
    rows_of_partials = partial_ptr + (batch * G + group) * 3 * SPLIT
    count = tl.zeros([BLOCK_G], dtype=tl.float32)
    group_mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    group_m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for first in range(0, SPLIT, MERGE_BLOCK):
        split = first + tl.arange(0, MERGE_BLOCK)
        partial_mask = group_mask[:, None] & (split < SPLIT)[None, :]
        partial = rows_of_partials[:, None] + split[None, :]
        counts = tl.load(partial, mask=partial_mask, other=0.0)
        means = tl.load(partial + SPLIT, mask=partial_mask, other=0.0)
        m2s = tl.load(partial + 2 * SPLIT, mask=partial_mask, other=0.0)
        block_count = tl.sum(counts, axis=1)
        block_mean = tl.sum(counts * means, axis=1) / tl.maximum(block_count, 1.0)
        spread = means - block_mean[:, None]
        block_m2 = tl.sum(m2s + counts * spread * spread, axis=1)
        new_count = count + block_count
        weight = block_count / tl.maximum(new_count, 1.0)
        delta = block_mean - group_mean
        group_mean = group_mean + delta * weight
        group_m2 = group_m2 + block_m2 + delta * delta * count * weight
        count = new_count
    group_rstd = 1.0 / tl.sqrt(group_m2 / tl.maximum(count, 1.0) + eps)  # max: masked slots stay finite

    # Groups -> columns through the same one-hot matrix as the stats kernel, then fold normalisation,
    # the input shift and the affine into one multiply-add per element (as the per-group apply kernel).
    member = (cols // CG)[:, None] == slot[None, :]
    centre = -tl.sum(tl.where(member, group_mean[None, :], 0.0), axis=1)
    scale = tl.sum(tl.where(member, group_rstd[None, :], 0.0), axis=1)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c0 + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        centre += tl.load(s_ptr + batch * stride_sb + (c0 + cols) * stride_sc, mask=col_mask, other=0.0).to(tl.float32)
    offset = centre * scale
    if HAS_BIAS:
        offset += tl.load(b_ptr + c0 + cols, mask=col_mask, other=0.0).to(tl.float32)

    y = x.to(tl.float32) * scale[None, :] + offset[None, :]
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    tl.store(
        y_ptr + batch.to(tl.int64) * stride_yb + c0 + pos[:, None] * stride_yp + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _group_norm_one_pass_kernel(
    x_ptr,  # *T input, logical [B, C, P]: element (b, c, p) at b*stride_xb + c*stride_xc + p*stride_xp
    y_ptr,  # *T output, logical [B, C, P], addressed through the y strides below
    w_ptr,  # *fp32|fp16|bf16 weight [C], contiguous; unused when HAS_WEIGHT is False
    b_ptr,  # *fp32|fp16|bf16 bias [C], contiguous; unused when HAS_BIAS is False
    s_ptr,  # *T shift, logical [B, C]: element (b, c) at b*stride_sb + c*stride_sc; unused without HAS_SHIFT
    stride_xb,  # x: elements between consecutive batch items
    stride_xc,  # x: elements between consecutive channels (1 for channels_last)
    stride_xp,  # x: elements between consecutive spatial positions h*W+w (1 for NCHW-contiguous)
    stride_yb,  # y: elements between consecutive batch items
    stride_yc,  # y: elements between consecutive channels
    stride_yp,  # y: elements between consecutive spatial positions
    stride_sb,  # shift: elements between consecutive batch items (0 for a [1, C] or broadcast shift)
    stride_sc,  # shift: elements between consecutive channels
    CG,  # channels per group
    HW,  # spatial positions per channel, H*W
    G,  # number of groups
    eps,  # added to the variance before the reciprocal square root
    BLOCK_HW: tl.constexpr,  # power of two >= HW: the whole group is one tile
    BLOCK_C: tl.constexpr,  # power of two >= CG
    HAS_WEIGHT: tl.constexpr,  # multiply by weight[c]
    HAS_BIAS: tl.constexpr,  # add bias[c]
    HAS_SHIFT: tl.constexpr,  # add shift[b, c] to x before the statistics
    APPLY_SILU: tl.constexpr,  # y = y * sigmoid(y) after the affine
):
    pid_bg = tl.program_id(0)
    batch = pid_bg // G
    group = pid_bg % G
    pos = tl.arange(0, BLOCK_HW)
    chan = tl.arange(0, BLOCK_C)
    chan_mask = chan < CG
    mask = (pos < HW)[:, None] & chan_mask[None, :]
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + (group * CG).to(tl.int64) * stride_xc
    x = tl.load(x_base + pos[:, None] * stride_xp + chan[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        shift = tl.load(s_ptr + batch * stride_sb + (group * CG + chan) * stride_sc, mask=chan_mask, other=0.0)
        x = tl.where(mask, x + shift.to(tl.float32)[None, :], 0.0)  # masked lanes stay 0 for the sums

    # The group is in registers: exact two-pass statistics, one read of memory.
    count = (CG * HW).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(centred * centred, axis=1), axis=0) / count + eps)
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    y = centred * scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    y_base = y_ptr + batch.to(tl.int64) * stride_yb + (group * CG).to(tl.int64) * stride_yc
    tl.store(y_base + pos[:, None] * stride_yp + chan[None, :] * stride_yc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_looped_kernel(
    x_ptr,  # *T input, logical [B, C, P]: element (b, c, p) at b*stride_xb + c*stride_xc + p*stride_xp
    y_ptr,  # *T output, logical [B, C, P], addressed through the y strides below
    w_ptr,  # *fp32|fp16|bf16 weight [C], contiguous; unused when HAS_WEIGHT is False
    b_ptr,  # *fp32|fp16|bf16 bias [C], contiguous; unused when HAS_BIAS is False
    s_ptr,  # *T shift, logical [B, C]: element (b, c) at b*stride_sb + c*stride_sc; unused without HAS_SHIFT
    stride_xb,  # x: elements between consecutive batch items
    stride_xc,  # x: elements between consecutive channels (1 for channels_last)
    stride_xp,  # x: elements between consecutive spatial positions h*W+w (1 for NCHW-contiguous)
    stride_yb,  # y: elements between consecutive batch items
    stride_yc,  # y: elements between consecutive channels
    stride_yp,  # y: elements between consecutive spatial positions
    stride_sb,  # shift: elements between consecutive batch items (0 for a [1, C] or broadcast shift)
    stride_sc,  # shift: elements between consecutive channels
    CG,  # channels per group
    HW,  # spatial positions per channel, H*W
    G,  # number of groups
    NUM_C_TILES,  # channel tiles per group, cdiv(CG, BLOCK_C)
    NUM_TILES,  # tiles per group, NUM_C_TILES * cdiv(HW, BLOCK_HW)
    eps,  # added to the variance before the reciprocal square root
    BLOCK_HW: tl.constexpr,  # tile extent along spatial positions (power of two)
    BLOCK_C: tl.constexpr,  # tile extent along channels (power of two)
    HAS_WEIGHT: tl.constexpr,  # multiply by weight[c]
    HAS_BIAS: tl.constexpr,  # add bias[c]
    HAS_SHIFT: tl.constexpr,  # add shift[b, c] to x before the statistics
    APPLY_SILU: tl.constexpr,  # y = y * sigmoid(y) after the affine
):
    pid_bg = tl.program_id(0)
    batch = pid_bg // G
    group = pid_bg % G
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + (group * CG).to(tl.int64) * stride_xc
    y_base = y_ptr + batch.to(tl.int64) * stride_yb + (group * CG).to(tl.int64) * stride_yc
    s_row = s_ptr + batch * stride_sb + group * CG * stride_sc
    offs_p = tl.arange(0, BLOCK_HW)
    offs_c = tl.arange(0, BLOCK_C)

    # Sweep 1: the split stats kernel's statistics over the whole group (two-pass per tile in registers,
    # Chan's merge across tiles), so the variance never goes through E[x^2] - E[x]^2.
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for tile in range(NUM_TILES):
        tile_p = tile // NUM_C_TILES
        tile_c = tile % NUM_C_TILES
        pos = tile_p * BLOCK_HW + offs_p
        chan = tile_c * BLOCK_C + offs_c
        mask = (pos < HW)[:, None] & (chan < CG)[None, :]
        x = tl.load(x_base + pos[:, None] * stride_xp + chan[None, :] * stride_xc, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_SHIFT:
            s_chan = tl.load(s_row + chan * stride_sc, mask=chan < CG, other=0.0).to(tl.float32)
            x = tl.where(mask, x + s_chan[None, :], 0.0)  # masked lanes stay 0 for the sums
        rows = tl.minimum(HW - tile_p * BLOCK_HW, BLOCK_HW)
        cols = tl.minimum(CG - tile_c * BLOCK_C, BLOCK_C)
        tile_count = (rows * cols).to(tl.float32)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tile_count
        centred = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        new_count = count + tile_count
        delta = tile_mean - mean
        weight = tile_count / new_count
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * count * weight
        count = new_count
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    # Sweep 2: the group again (from L2 on a GPU when it fits), folded into one multiply-add per element
    # as in the split apply kernel: ((x + s) - mean) * scale + bias = x * scale + (s - mean) * scale + bias.
    for tile in range(NUM_TILES):
        tile_p = tile // NUM_C_TILES
        tile_c = tile % NUM_C_TILES
        pos = tile_p * BLOCK_HW + offs_p
        chan = tile_c * BLOCK_C + offs_c
        chan_mask = chan < CG
        mask = (pos < HW)[:, None] & chan_mask[None, :]
        if HAS_WEIGHT:
            scale = tl.load(w_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32) * rstd
        else:
            scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
        centre = tl.zeros([BLOCK_C], dtype=tl.float32) - mean
        if HAS_SHIFT:
            centre += tl.load(s_row + chan * stride_sc, mask=chan_mask, other=0.0).to(tl.float32)
        offset = centre * scale
        if HAS_BIAS:
            offset += tl.load(b_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32)
        x = tl.load(x_base + pos[:, None] * stride_xp + chan[None, :] * stride_xc, mask=mask, other=0.0)
        y = x.to(tl.float32) * scale[None, :] + offset[None, :]
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + pos[:, None] * stride_yp + chan[None, :] * stride_yc, y.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and grid of one GroupNorm call (see `choose_config` for the reasoning)."""

    block_hw: int  # tile extent along spatial positions
    block_c: int  # tile extent along channels
    num_c_tiles: int  # channel tiles per group
    num_tiles: int  # tiles per group
    tiles_per_prog: int  # tiles reduced by one stats program
    split: int  # stats programs per group
    num_warps: int


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _cheapest_channel_block(channels_per_group: int, block_hw: int, limit: int) -> int:
    """Power of two <= limit minimising tiles * (tile lanes + per-program overhead): avoids masked lanes
    (Cg = 10, 20, 40 at large H*W tile exactly as 2, 4, 8) without cutting small groups into many
    tiny programs (Cg = 30 at 4x3 positions takes one 16x32 tile, not fifteen 16x2 ones)."""
    best, best_cost = 1, None
    block = 1
    while block <= limit:
        cost = triton.cdiv(channels_per_group, block) * (block_hw * block + PROGRAM_OVERHEAD_ELEMENTS)
        if best_cost is None or cost <= best_cost:
            best, best_cost = block, cost
        block *= 2
    return best


def choose_config(
    batch: int,
    channels_per_group: int,
    hw: int,
    groups: int,
    channels_contiguous: bool,
    sm_count: int = DEFAULT_SM_COUNT,
) -> LaunchConfig:
    """Tile shape and split, chosen from the shape and the memory format.

    - The tile's long side runs along the contiguous axis, so loads are wide and coalesced:
      NCHW: up to MAX_TILE spatial positions; channels fill the rest (`_cheapest_channel_block`).
      channels_last (only groups too wide for `choose_channels_last_config`, or an `out` whose channels
      are not contiguous): a group's channels are a contiguous run, so the tile spans all of them
      (next power of two; the memory traffic is still exact) and as many spatial rows as fit in MAX_TILE.
    - Warps: one per 1024 elements (NCHW; 512 for channels_last), so no thread spills (test_sass).
    - Split: enough stats programs to give each SM about STATS_PROGRAMS_PER_SM, at most MAX_SPLIT
      chunks per group; a program reduces TILES_PER_PROG consecutive tiles.
    """
    cg_pow2 = triton.next_power_of_2(channels_per_group)
    if channels_contiguous:
        block_c = min(cg_pow2, MAX_TILE)
        block_hw = min(triton.next_power_of_2(hw), _pow2_at_most(MAX_TILE // block_c))
    else:
        block_hw = min(triton.next_power_of_2(hw), MAX_TILE)
        block_c = _cheapest_channel_block(channels_per_group, block_hw, max(MAX_TILE // block_hw, 1))
    num_c_tiles = triton.cdiv(channels_per_group, block_c)
    num_tiles = num_c_tiles * triton.cdiv(hw, block_hw)
    wanted_split = triton.cdiv(STATS_PROGRAMS_PER_SM * sm_count, batch * groups)
    split = max(1, min(num_tiles, MAX_SPLIT, wanted_split))
    tiles_per_prog = triton.cdiv(num_tiles, split)
    split = triton.cdiv(num_tiles, tiles_per_prog)  # no program left without a tile
    # Channels-last tiles load element by element (a group's channel run is not 16-byte aligned), each
    # lane holding its own 64-bit address: half the elements per thread there, or ptxas spills.
    elements_per_warp = 512 if channels_contiguous else 1024
    num_warps = max(1, min(8, block_hw * block_c // elements_per_warp))
    return LaunchConfig(block_hw, block_c, num_c_tiles, num_tiles, tiles_per_prog, split, num_warps)


@dataclass(frozen=True)
class OnePassConfig:
    """One program per (batch, group) holding the whole group in registers (see `choose_one_pass_config`)."""

    block_hw: int  # power of two >= H*W
    block_c: int  # power of two >= channels per group
    num_warps: int


def choose_one_pass_config(channels_per_group: int, hw: int) -> OnePassConfig | None:
    """The one-pass tile when a whole group fits ONE_PASS_MAX_LANES lanes, else None (the split kernels).

    One launch that reads x once, against two launches and a second read for the split kernels; it has
    only batch * groups programs (64 at SD's guided batch), which suits the small groups it takes
    (SD 1.5 at 16x16 and 8x8), where the split design's second launch costs more than its parallelism buys.
    """
    block_hw = triton.next_power_of_2(hw)
    block_c = triton.next_power_of_2(channels_per_group)
    lanes = block_hw * block_c
    if lanes > ONE_PASS_MAX_LANES:
        return None
    return OnePassConfig(block_hw, block_c, max(1, min(ONE_PASS_MAX_WARPS, lanes // (32 * ONE_PASS_LANES_PER_THREAD))))


@dataclass(frozen=True)
class LoopedConfig:
    """One program per (batch, group) sweeping the group in tiles twice (see `choose_looped_config`)."""

    block_hw: int  # tile extent along spatial positions
    block_c: int  # tile extent along channels
    num_c_tiles: int  # channel tiles per group
    num_tiles: int  # tiles per group
    num_warps: int


def choose_looped_config(
    channels_per_group: int, hw: int, groups: int, channels_contiguous: bool
) -> LoopedConfig | None:
    """The looped kernel's tiles when a group has at most LOOPED_MAX_GROUP_ELEMENTS elements, else None.

    The tiles are the split kernels' (`choose_config`: long side along the contiguous axis, the same
    warps, so the same register budget); only the grid differs: no split, no partials, one launch.
    """
    if channels_per_group * hw > LOOPED_MAX_GROUP_ELEMENTS:
        return None
    tiles = choose_config(1, channels_per_group, hw, groups, channels_contiguous)
    return LoopedConfig(tiles.block_hw, tiles.block_c, tiles.num_c_tiles, tiles.num_tiles, tiles.num_warps)


@dataclass(frozen=True)
class ChannelsLastConfig:
    """Tile shape and grid of one channels_last GroupNorm call (see `choose_channels_last_config`)."""

    groups_per_chunk: int  # whole groups in one channel chunk
    block_c: int  # tile extent along channels: power of two holding the chunk's channels
    block_g: int  # power of two >= groups_per_chunk, >= MIN_BLOCK_G
    num_chunks: int  # channel chunks per batch item
    block_hw: int  # tile extent along spatial positions
    num_tiles: int  # spatial tiles per batch item, cdiv(H*W, block_hw)
    tiles_per_prog: int  # spatial tiles reduced by one stats program
    split: int  # stats programs per (batch item, channel chunk)
    num_warps: int


def _channel_chunking(channels: int, groups: int) -> tuple[int, int] | None:
    """(tile width, groups per chunk) for channels_last tiles, or None when one group is wider than
    CHANNELS_LAST_MAX_WIDTH.

    A chunk is a run of whole groups inside a power-of-two tile width, so each group's statistics stay
    inside one program. Its width k*Cg is kept a multiple of CHUNK_ALIGN channels when possible, so
    every chunk starts on a 16-byte boundary (fp16/bf16; 32 bytes in fp32) and loads 128 bits per
    lane. Among widths, the one with the fewest masked lanes wins; ties go to the narrower width,
    which makes more chunks (more programs to fill the chip) and fewer groups to merge per program.
    SD's Cg = 10, 20, 30, 40, 60, 80 at 32 groups become 12, 6, 4, 3, 2, 3 groups in 128 or 256 lanes:
    83-94% of the lanes used, against 62.5% for a tile of next_pow2(C) lanes; the VAE's Cg = 4, 8, 16
    fill 64 lanes exactly.
    """
    cg = channels // groups
    for require_alignment in (True, False):
        best, best_used = None, 0.0
        width = CHANNELS_LAST_MIN_WIDTH
        while width <= CHANNELS_LAST_MAX_WIDTH:
            k = min(groups, width // cg)
            # One chunk holding every group starts at channel 0: aligned whatever its width.
            while require_alignment and 0 < k < groups and (k * cg) % CHUNK_ALIGN:
                k -= 1
            if k > 0:
                used = channels / (triton.cdiv(groups, k) * width)
                if used > best_used:
                    best, best_used = (width, k), used
            width *= 2
        if best is not None:
            return best
    return None


def choose_channels_last_config(
    batch: int, channels: int, hw: int, groups: int, sm_count: int = DEFAULT_SM_COUNT
) -> ChannelsLastConfig | None:
    """Tiles of [BLOCK_HW positions, one channel chunk] for channels_last input; None when a group is too
    wide for a chunk (then `choose_config`'s per-group tiles serve).

    In channels_last a position's channels are one contiguous run, so a tile whose rows are positions
    and whose columns are a chunk of whole groups loads coalesced and vectorised; the per-group
    statistics come from a segmented reduction over the columns (see the stats kernel).
    - BLOCK_HW: as many positions as fit in MAX_TILE lanes; one warp per 1024 lanes (32 per thread:
      the vector loads leave registers to spare, test_sass checks for spills).
    - Split: stats programs per (batch, chunk) to give each SM about STATS_PROGRAMS_PER_SM, at most
      MERGE_LANES // BLOCK_G, so that every apply program's merge of its groups' partials stays well
      under its tile's work.
    """
    chunking = _channel_chunking(channels, groups)
    if chunking is None:
        return None
    block_c, groups_per_chunk = chunking
    block_g = max(MIN_BLOCK_G, triton.next_power_of_2(groups_per_chunk))
    num_chunks = triton.cdiv(groups, groups_per_chunk)
    block_hw = min(triton.next_power_of_2(hw), max(MAX_TILE // block_c, 1))
    num_tiles = triton.cdiv(hw, block_hw)
    wanted_split = triton.cdiv(STATS_PROGRAMS_PER_SM * sm_count, batch * num_chunks)
    split = max(1, min(num_tiles, wanted_split, max(MERGE_LANES // block_g, 1)))
    tiles_per_prog = triton.cdiv(num_tiles, split)
    split = triton.cdiv(num_tiles, tiles_per_prog)  # no program left without a tile
    num_warps = max(1, min(8, block_hw * block_c // 1024))
    return ChannelsLastConfig(
        groups_per_chunk, block_c, block_g, num_chunks, block_hw, num_tiles, tiles_per_prog, split, num_warps
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _spatial_stride(t: torch.Tensor) -> int | None:
    """Stride of the flattened H*W axis, or None when H and W cannot be flattened without a copy."""
    _, _, h, w = t.shape
    if h == 1:
        return t.stride(3) if w > 1 else 1
    if w == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == w * t.stride(3) else None


def _check_inputs(x, num_groups, weight, bias, eps, activation, out=None, shift=None) -> None:
    """Clear errors for bad input, before any kernel sees it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"group_norm: x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"group_norm: x dtype {x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(f"group_norm: channels ({channels}) must be divisible by num_groups ({num_groups})")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"group_norm: {name} must be a tensor or None, got {type(param).__name__}")
        if tuple(param.shape) != (channels,):
            raise ValueError(
                f"group_norm: {name} must have shape ({channels},) for {channels} channels, got {tuple(param.shape)}"
            )
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"group_norm: {name} dtype {param.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if param.device != x.device:
            raise ValueError(f"group_norm: {name} is on {param.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"group_norm: eps must be a non-negative float, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if channels * x.shape[2] * x.shape[3] >= 2**31:
        raise ValueError(
            f"group_norm: one batch item of shape {tuple(x.shape[1:])} has >= 2**31 elements; "
            "in-batch offsets are 32-bit"
        )
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"group_norm: out must be a tensor, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"group_norm: out must match x in shape, dtype and device: out is "
                f"{tuple(out.shape)} {out.dtype} {out.device}, x is "
                f"{tuple(x.shape)} {x.dtype} {x.device}"
            )
        if _spatial_stride(out) is None:
            raise ValueError(f"group_norm: out strides {out.stride()} do not allow flattening H and W")
    if shift is not None:
        if not isinstance(shift, torch.Tensor):
            raise TypeError(f"group_norm: shift must be a tensor or None, got {type(shift).__name__}")
        if shift.dim() != 2 or shift.shape[1] != channels or shift.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"group_norm: shift must have shape ({x.shape[0]}, {channels}) or (1, {channels}) for x of shape "
                f"{tuple(x.shape)}, got {tuple(shift.shape)}"
            )
        if shift.dtype != x.dtype:
            raise TypeError(f"group_norm: shift dtype {shift.dtype} must match x dtype {x.dtype}")
        if shift.device != x.device:
            raise ValueError(f"group_norm: shift is on {shift.device} but x is on {x.device}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"group_norm: x is on {x.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )


Config = OnePassConfig | LoopedConfig | ChannelsLastConfig | LaunchConfig


def plan(
    x: torch.Tensor,
    num_groups: int,
    out: torch.Tensor,
    sm_count: int | None = None,
    allow_one_pass: bool = True,
    allow_looped: bool = True,
) -> Config:
    """The configuration `launch` runs for these tensors (checked as group_norm checks them); the census
    asks it too (`launches_and_reads`), so the counted kernels are the launched ones.

    The one-pass kernel wherever a group fits its tile; else the looped kernel up to
    LOOPED_MAX_GROUP_ELEMENTS; else, for channels_last x and out, the chunked split kernels when a group
    fits a chunk; else the per-group split kernels. allow_one_pass / allow_looped = False skip a path, to
    give what the launcher would take without it (tests and the benchmark compare them).
    """
    batch, channels, h, w = x.shape
    stride_xp = _spatial_stride(x)  # None: `launch` copies x to NCHW-contiguous first
    channels_contiguous = stride_xp is not None and x.stride(1) == 1 and channels > 1 and stride_xp != 1
    cg = channels // num_groups
    one_pass = choose_one_pass_config(cg, h * w) if allow_one_pass else None
    if one_pass is not None:
        return one_pass
    looped = choose_looped_config(cg, h * w, num_groups, channels_contiguous) if allow_looped else None
    if looped is not None:
        return looped
    if sm_count is None:
        sm_count = _sm_count(x.device.index or 0) if x.is_cuda else DEFAULT_SM_COUNT
    if channels_contiguous and out.stride(1) == 1:
        config = choose_channels_last_config(batch, channels, h * w, num_groups, sm_count)
        if config is not None:
            return config
    return choose_config(batch, cg, h * w, num_groups, channels_contiguous, sm_count)


def launches_and_reads(config: Config, hw: int) -> tuple[int, int]:
    """(kernel launches, reads of x) of one call under `config`: the one-pass kernel reads x once in one
    launch; the looped kernel twice in one launch (the second read's L2 hits are not modelled); the split
    kernels twice, in a stats launch and one apply launch per `_spatial_launches`."""
    if isinstance(config, OnePassConfig):
        return 1, 1
    if isinstance(config, LoopedConfig):
        return 1, 2
    return 1 + len(_spatial_launches(hw, config.block_hw)), 2


def launch(
    x: torch.Tensor,
    num_groups: int,
    weight,
    bias,
    eps: float,
    activation,
    out: torch.Tensor,
    config: Config | None = None,
    shift: torch.Tensor | None = None,
) -> None:
    """Run the kernels, writing into `out` (inputs as group_norm checks them). `config` overrides the
    chosen configuration (`plan`; tests and benchmarks use it); its type picks the path: ChannelsLastConfig
    needs x and out with channel stride 1; OnePassConfig needs block sizes covering the whole group."""
    if out.numel() == 0:
        return
    if _spatial_stride(x) is None:
        x = x.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if config is None:
        config = plan(x, num_groups, out)
    if shift is None:
        shift_args = (x, 0, 0)  # a valid pointer, never read (HAS_SHIFT is False)
    else:  # a [1, C] shift serves every batch item: batch stride 0
        shift_args = (shift, 0 if shift.shape[0] == 1 else shift.stride(0), shift.stride(1))
    if isinstance(config, OnePassConfig):
        _launch_one_pass(x, num_groups, weight, bias, eps, activation, out, config, shift_args)
    elif isinstance(config, LoopedConfig):
        _launch_looped(x, num_groups, weight, bias, eps, activation, out, config, shift_args)
    elif isinstance(config, ChannelsLastConfig):
        _launch_channels_last(x, num_groups, weight, bias, eps, activation, out, config, shift_args)
    else:
        _launch_per_group(x, num_groups, weight, bias, eps, activation, out, config, shift_args)


def _launch_one_pass(x, num_groups, weight, bias, eps, activation, out, config: OnePassConfig, shift_args):
    batch, channels, h, w = x.shape
    cg = channels // num_groups
    if config.block_hw < h * w or config.block_c < cg:
        raise ValueError(f"group_norm: {config} does not cover a group of {cg} channels x {h * w} positions")
    s_ptr, stride_sb, stride_sc = shift_args
    _group_norm_one_pass_kernel[(batch * num_groups,)](
        x,
        out,
        weight if weight is not None else x,
        bias if bias is not None else x,
        s_ptr,
        x.stride(0),
        x.stride(1),
        _spatial_stride(x),
        out.stride(0),
        out.stride(1),
        _spatial_stride(out),
        stride_sb,
        stride_sc,
        cg,
        h * w,
        num_groups,
        float(eps),
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SHIFT=s_ptr is not x,
        APPLY_SILU=activation == "silu",
        num_warps=config.num_warps,
    )


def _launch_looped(x, num_groups, weight, bias, eps, activation, out, config: LoopedConfig, shift_args):
    batch, channels, h, w = x.shape
    cg = channels // num_groups
    if config.num_tiles != config.num_c_tiles * triton.cdiv(h * w, config.block_hw) or config.num_c_tiles != (
        triton.cdiv(cg, config.block_c)
    ):
        raise ValueError(f"group_norm: {config} does not tile a group of {cg} channels x {h * w} positions")
    s_ptr, stride_sb, stride_sc = shift_args
    _group_norm_looped_kernel[(batch * num_groups,)](
        x,
        out,
        weight if weight is not None else x,
        bias if bias is not None else x,
        s_ptr,
        x.stride(0),
        x.stride(1),
        _spatial_stride(x),
        out.stride(0),
        out.stride(1),
        _spatial_stride(out),
        stride_sb,
        stride_sc,
        cg,
        h * w,
        num_groups,
        config.num_c_tiles,
        config.num_tiles,
        float(eps),
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SHIFT=s_ptr is not x,
        APPLY_SILU=activation == "silu",
        num_warps=config.num_warps,
    )


def _launch_channels_last(x, num_groups, weight, bias, eps, activation, out, config: ChannelsLastConfig, shift_args):
    batch, channels, h, w = x.shape
    cg = channels // num_groups
    s_ptr, stride_sb, stride_sc = shift_args
    partial = torch.empty((batch * num_groups, 3, config.split), dtype=torch.float32, device=x.device)
    common = dict(
        CG=cg,
        GROUPS_PER_CHUNK=config.groups_per_chunk,
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        BLOCK_G=config.block_g,
        HAS_SHIFT=s_ptr is not x,
        num_warps=config.num_warps,
    )
    _group_norm_cl_stats_kernel[(batch * config.num_chunks, config.split)](
        x,
        partial,
        s_ptr,
        x.stride(0),
        _spatial_stride(x),
        stride_sb,
        stride_sc,
        channels,
        h * w,
        num_groups,
        config.num_chunks,
        config.tiles_per_prog,
        config.split,
        **common,
    )
    for p0, tiles in _spatial_launches(h * w, config.block_hw):
        _group_norm_cl_apply_kernel[(batch * config.num_chunks, tiles)](
            _at_position(x, p0),
            _at_position(out, p0),
            weight if weight is not None else x,
            bias if bias is not None else x,
            partial,
            s_ptr,
            x.stride(0),
            _spatial_stride(x),
            out.stride(0),
            _spatial_stride(out),
            stride_sb,
            stride_sc,
            channels,
            h * w - p0,
            num_groups,
            config.num_chunks,
            config.split,
            float(eps),
            MERGE_BLOCK=MERGE_BLOCK,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            APPLY_SILU=activation == "silu",
            **common,
        )


def _spatial_launches(hw: int, block_hw: int) -> list[tuple[int, int]]:
    """(first position, tiles) of each apply launch: one launch unless the tiles exceed MAX_GRID_Y."""
    tiles = triton.cdiv(hw, block_hw)
    return [(first * block_hw, min(MAX_GRID_Y, tiles - first)) for first in range(0, tiles, MAX_GRID_Y)]


def _at_position(t: torch.Tensor, p0: int) -> torch.Tensor:
    """`t` from spatial position p0 on, for a kernel that addresses it from its first element (the
    kernels take pointers: only the start address and dtype matter)."""
    if p0 == 0:
        return t
    return t.as_strided((1,), (1,), t.storage_offset() + p0 * _spatial_stride(t))


def _launch_per_group(x, num_groups, weight, bias, eps, activation, out, config: LaunchConfig, shift_args):
    batch, channels, h, w = x.shape
    hw = h * w
    cg = channels // num_groups
    stride_xp = _spatial_stride(x)
    s_ptr, stride_sb, stride_sc = shift_args
    partial = torch.empty((batch * num_groups, config.split, 3), dtype=torch.float32, device=x.device)
    _group_norm_stats_kernel[(batch * num_groups, config.split)](
        x,
        partial,
        s_ptr,
        x.stride(0),
        x.stride(1),
        stride_xp,
        stride_sb,
        stride_sc,
        cg,
        hw,
        num_groups,
        config.num_c_tiles,
        config.num_tiles,
        config.tiles_per_prog,
        config.split,
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        HAS_SHIFT=s_ptr is not x,
        num_warps=config.num_warps,
    )
    for p0, tiles in _spatial_launches(hw, config.block_hw):
        _group_norm_apply_kernel[(batch * num_groups, tiles, config.num_c_tiles)](
            _at_position(x, p0),
            _at_position(out, p0),
            weight if weight is not None else x,
            bias if bias is not None else x,
            partial,
            s_ptr,
            x.stride(0),
            x.stride(1),
            stride_xp,
            out.stride(0),
            out.stride(1),
            _spatial_stride(out),
            stride_sb,
            stride_sc,
            cg,
            hw - p0,
            num_groups,
            config.split,
            float(eps),
            BLOCK_HW=config.block_hw,
            BLOCK_C=config.block_c,
            MAX_SPLIT=MAX_SPLIT,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_SHIFT=s_ptr is not x,
            APPLY_SILU=activation == "silu",
            num_warps=config.num_warps,
        )


@torch.library.custom_op("sd_kernels::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.empty_like(x)
    launch(x, num_groups, weight, bias, eps, activation, out, shift=shift)
    return out


@_group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, activation, shift=None):
    return torch.empty_like(x)


@torch.library.custom_op("sd_kernels::group_norm_out", mutates_args=("out",))
def _group_norm_out_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
    out: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> None:
    launch(x, num_groups, weight, bias, eps, activation, out, shift=shift)


@_group_norm_out_op.register_fake
def _group_norm_out_fake(x, num_groups, weight, bias, eps, activation, out, shift=None):
    return None


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    out: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm over [B, C, H, W] (NCHW-contiguous or channels_last), then `activation` (None | "silu").

    `shift` ([B, C] or [1, C], x's dtype, any strides) is added to x per channel before the statistics,
    in fp32 inside the kernel. Statistics are computed in fp32; the result has x's dtype and memory
    format. With `out`, the result is written there (any strides that flatten H and W) and `out` is returned.
    """
    _check_inputs(x, num_groups, weight, bias, eps, activation, out, shift)
    if out is None:
        return torch.ops.sd_kernels.group_norm(x, num_groups, weight, bias, float(eps), activation, shift)
    torch.ops.sd_kernels.group_norm_out(x, num_groups, weight, bias, float(eps), activation, out, shift)
    return out


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    upcast: bool = True,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch GroupNorm(+SiLU) of x + shift[:, :, None, None]. upcast=True computes in fp32 (fp64 stays
    fp64) from the add on, then casts back; upcast=False adds and normalises in x's dtype, as torch would."""
    dtype = x.dtype
    compute = (torch.float64 if dtype == torch.float64 else torch.float32) if upcast else dtype
    x = x.to(compute)
    if shift is not None:
        x = x + shift.to(compute)[:, :, None, None]
    y = F.group_norm(
        x,
        num_groups,
        weight.to(compute) if weight is not None else None,
        bias.to(compute) if bias is not None else None,
        eps,
    )
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"group_norm_reference: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return y.to(dtype)


# Shapes the SD 1.x / 2.x / SDXL UNets and the SD VAE normalise, as (channels, H*W), at 32 groups.
_UNET_CHANNELS = (320, 640, 960, 1280, 1920, 2560)
_UNET_SIDES = (64, 32, 16, 8, 96, 48, 24, 12, 128)  # latent 64 (SD1.5), 96 (SD2 768), 128 (SDXL)
_VAE_CHANNELS = (128, 256, 512)
_VAE_SIDES = (64, 128, 256, 512)


# Scalars used only for loop bounds and partial-buffer indexing: their divisibility does not change the
# generated code's memory access, so AOT configs drop it (keeps the SASS test's compile count small).
_COUNT_ARGS = ("G", "SPLIT", "NUM_C_TILES", "NUM_TILES", "TILES_PER_PROG")
_CL_COUNT_ARGS = ("G", "NUM_CHUNKS", "TILES_PER_PROG", "SPLIT")


def _aot_configs_for(
    batch: int,
    channels: int,
    hw: int,
    channels_last: bool,
    dtype: torch.dtype,
    activation: str | None,
    affine: bool,
    groups: int = 32,
    shift: bool = False,
    allow_looped: bool = True,
) -> list[aot.AotConfig]:
    """The kernels `launch` runs for this call (asked of `plan` on meta tensors), as AOT configs."""
    x = torch.empty((batch, channels, hw, 1), device="meta", dtype=dtype)
    if channels_last:  # [B, C, HW, 1] in channels_last: position stride C, channel stride 1
        x = x.as_strided(x.shape, (channels * hw, 1, channels, channels))
    config = plan(x, groups, x, DEFAULT_SM_COUNT, allow_looped=allow_looped)
    # A [B, C] contiguous shift (batch stride C, channel stride 1), or none: x's pointer, strides 0.
    shift_args = (
        dict(s_ptr=dtype, stride_sb=channels, stride_sc=1) if shift else dict(s_ptr=dtype, stride_sb=0, stride_sc=0)
    )
    if isinstance(config, ChannelsLastConfig):
        return _aot_channels_last_configs(batch, channels, hw, groups, config, dtype, activation, affine, shift_args)
    cg = channels // groups
    stride_c, stride_p = (1, channels) if channels_last else (hw, 1)
    strides = dict(stride_xb=channels * hw, stride_xc=stride_c, stride_xp=stride_p)
    out_args = dict(
        x_ptr=dtype,
        y_ptr=dtype,
        w_ptr=dtype,
        b_ptr=dtype,
        stride_yb=channels * hw,
        stride_yc=stride_c,
        stride_yp=stride_p,
    )
    flags = dict(HAS_WEIGHT=affine, HAS_BIAS=affine, HAS_SHIFT=shift, APPLY_SILU=activation == "silu")
    if isinstance(config, OnePassConfig):
        args = dict(strides, **out_args, **shift_args, CG=cg, HW=hw, G=groups, eps=1e-5)
        constexprs = dict(flags, BLOCK_HW=config.block_hw, BLOCK_C=config.block_c)
        return [aot.config(_group_norm_one_pass_kernel, args, constexprs, config.num_warps, 3, ("G",))]
    if isinstance(config, LoopedConfig):
        args = dict(
            strides,
            **out_args,
            **shift_args,
            CG=cg,
            HW=hw,
            G=groups,
            NUM_C_TILES=config.num_c_tiles,
            NUM_TILES=config.num_tiles,
            eps=1e-5,
        )
        constexprs = dict(flags, BLOCK_HW=config.block_hw, BLOCK_C=config.block_c)
        return [aot.config(_group_norm_looped_kernel, args, constexprs, config.num_warps, 3, _COUNT_ARGS)]
    common = dict(strides, **shift_args, CG=cg, HW=hw, G=groups, SPLIT=config.split)
    stats_args = dict(
        common,
        x_ptr=dtype,
        partial_ptr=torch.float32,
        NUM_C_TILES=config.num_c_tiles,
        NUM_TILES=config.num_tiles,
        TILES_PER_PROG=config.tiles_per_prog,
    )
    apply_args = dict(common, **out_args, partial_ptr=torch.float32, eps=1e-5)
    apply_constexprs = dict(flags, BLOCK_HW=config.block_hw, BLOCK_C=config.block_c, MAX_SPLIT=MAX_SPLIT)
    return [
        aot.config(
            _group_norm_stats_kernel,
            stats_args,
            dict(BLOCK_HW=config.block_hw, BLOCK_C=config.block_c, HAS_SHIFT=shift),
            config.num_warps,
            3,
            _COUNT_ARGS,
        ),
        aot.config(_group_norm_apply_kernel, apply_args, apply_constexprs, config.num_warps, 3, _COUNT_ARGS),
    ]


def _aot_channels_last_configs(
    batch, channels, hw, groups, config: ChannelsLastConfig, dtype, activation, affine, shift_args
) -> list[aot.AotConfig]:
    common = dict(
        shift_args,
        stride_xb=channels * hw,
        stride_xp=channels,
        C=channels,
        HW=hw,
        G=groups,
        NUM_CHUNKS=config.num_chunks,
        SPLIT=config.split,
    )
    constexprs = dict(
        CG=channels // groups,
        GROUPS_PER_CHUNK=config.groups_per_chunk,
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        BLOCK_G=config.block_g,
        HAS_SHIFT=shift_args["stride_sc"] != 0,
    )
    stats_args = dict(common, x_ptr=dtype, partial_ptr=torch.float32, TILES_PER_PROG=config.tiles_per_prog)
    apply_args = dict(
        common,
        x_ptr=dtype,
        y_ptr=dtype,
        w_ptr=dtype,
        b_ptr=dtype,
        partial_ptr=torch.float32,
        stride_yb=channels * hw,
        stride_yp=channels,
        eps=1e-5,
    )
    apply_constexprs = dict(
        constexprs, MERGE_BLOCK=MERGE_BLOCK, HAS_WEIGHT=affine, HAS_BIAS=affine, APPLY_SILU=activation == "silu"
    )
    return [
        aot.config(_group_norm_cl_stats_kernel, stats_args, constexprs, config.num_warps, 3, _CL_COUNT_ARGS),
        aot.config(_group_norm_cl_apply_kernel, apply_args, apply_constexprs, config.num_warps, 3, _CL_COUNT_ARGS),
    ]


def aot_configs() -> list[aot.AotConfig]:
    """Every configuration (kernels/aot.py) the launcher compiles for the real model shapes at batch 1
    and 2 in either memory format and dtype, with and without SiLU, plus the no-affine, odd-size and
    channels_last fallback variants, and the split kernels of the looped kernel's shapes (batch 2, fp16,
    SiLU and shift); duplicates removed."""
    shapes = [(c, s * s) for c in _UNET_CHANNELS for s in _UNET_SIDES]
    shapes += [(c, s * s) for c in _VAE_CHANNELS for s in _VAE_SIDES]
    configs = []
    for batch in (1, 2):
        for channels, hw in shapes:
            for channels_last in (False, True):
                for dtype in SUPPORTED_DTYPES:
                    for activation in ACTIVATIONS:
                        configs += _aot_configs_for(batch, channels, hw, channels_last, dtype, activation, True)
                    # A shift comes with the resnets' second norm: SiLU and affine, at any batch size.
                    configs += _aot_configs_for(batch, channels, hw, channels_last, dtype, "silu", True, shift=True)
                # The split kernels the looped kernel replaced, at the guided batch in fp16, so that
                # setting LOOPED_MAX_GROUP_ELEMENTS lower after the GPU check needs no new compile check.
                if batch == 2:
                    configs += _aot_configs_for(
                        2, channels, hw, channels_last, torch.float16, "silu", True, shift=True, allow_looped=False
                    )
    configs += _aot_configs_for(2, 320, 64 * 64, False, torch.float16, "silu", False)
    configs += _aot_configs_for(2, 320, 7 * 9, True, torch.float16, "silu", True)
    # A channels_last group wider than CHANNELS_LAST_MAX_WIDTH takes the per-group kernels.
    configs += _aot_configs_for(1, 640, 8 * 8, True, torch.float16, "silu", True, groups=1)
    return aot.unique(configs)
