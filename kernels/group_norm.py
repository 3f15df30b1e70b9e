"""GroupNorm with an optional fused SiLU: two Triton kernels, a launcher and a pure-torch reference.

Design (forward only, inference): two kernels per call, statistics then normalisation, in one of two
tilings chosen by the memory format.

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
# CUDA's limit on grid axes 1 and 2. The apply kernels' axis 1 counts spatial tiles (H*W / 64 for the
# VAE's channels_last tiles: over the limit past 4.19M positions, a 2048x2048 decode), so a launch covers
# at most this many tiles and the rest go to further launches on an offset view.
MAX_GRID_Y = 65535


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,  # *T input, logical [B, C, P]: element (b, c, p) at b*stride_xb + c*stride_xc + p*stride_xp
    partial_ptr,  # *fp32 output, [B*G, SPLIT, 3]: (count, mean, M2) of each chunk of each group
    stride_xb,  # x: elements between consecutive batch items
    stride_xc,  # x: elements between consecutive channels (1 for channels_last)
    stride_xp,  # x: elements between consecutive spatial positions h*W+w (1 for NCHW-contiguous)
    CG,  # channels per group
    HW,  # spatial positions per channel, H*W
    G,  # number of groups
    NUM_C_TILES,  # channel tiles per group, cdiv(CG, BLOCK_C)
    NUM_TILES,  # tiles per group, NUM_C_TILES * cdiv(HW, BLOCK_HW)
    TILES_PER_PROG,  # consecutive tiles reduced by one program
    SPLIT,  # programs per group (grid axis 1)
    BLOCK_HW: tl.constexpr,  # tile extent along spatial positions (power of two)
    BLOCK_C: tl.constexpr,  # tile extent along channels (power of two)
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    batch = pid_bg // G
    group = pid_bg % G
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + (group * CG).to(tl.int64) * stride_xc
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
    stride_xb,  # x: elements between consecutive batch items
    stride_xc,  # x: elements between consecutive channels
    stride_xp,  # x: elements between consecutive spatial positions h*W+w
    stride_yb,  # y: elements between consecutive batch items
    stride_yc,  # y: elements between consecutive channels
    stride_yp,  # y: elements between consecutive spatial positions
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

    # Fold normalisation and affine into one multiply-add per element.
    chan = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_mask = chan < CG
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(b_ptr + group * CG + chan, mask=chan_mask, other=0.0).to(tl.float32)

    pos = pid_p * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (pos < HW)[:, None] & chan_mask[None, :]
    x_base = x_ptr + batch.to(tl.int64) * stride_xb + (group * CG).to(tl.int64) * stride_xc
    x = tl.load(x_base + pos[:, None] * stride_xp + chan[None, :] * stride_xc, mask=mask, other=0.0)
    y = x.to(tl.float32) * scale[None, :] + shift[None, :]
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    y_base = y_ptr + batch.to(tl.int64) * stride_yb + (group * CG).to(tl.int64) * stride_yc
    tl.store(y_base + pos[:, None] * stride_yp + chan[None, :] * stride_yc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_cl_stats_kernel(
    x_ptr,  # *T input, channels_last: element (b, c, p) at b*stride_xb + p*stride_xp + c (channel stride 1)
    partial_ptr,  # *fp32 output, [B*G, 3, SPLIT]: count, mean and M2 of each group in each spatial chunk
    stride_xb,  # x: elements between consecutive batch items
    stride_xp,  # x: elements between consecutive spatial positions h*W+w (>= C)
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

    # Per-column running statistics over this program's rows; every column has seen the same `count`.
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TILES_PER_PROG):
        first = (pid_s * TILES_PER_PROG + i) * BLOCK_HW  # may lie past HW in the last chunk: then empty
        pos = first + offs_p
        mask = (pos < HW)[:, None] & col_mask[None, :]
        x = tl.load(x_base + pos[:, None] * stride_xp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
    stride_xb,  # x: elements between consecutive batch items
    stride_xp,  # x: elements between consecutive spatial positions
    stride_yb,  # y: elements between consecutive batch items
    stride_yp,  # y: elements between consecutive spatial positions
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

    # Groups -> columns through the same one-hot matrix as the stats kernel, then fold normalisation
    # and affine into one multiply-add per element.
    member = (cols // CG)[:, None] == slot[None, :]
    col_mean = tl.sum(tl.where(member, group_mean[None, :], 0.0), axis=1)
    scale = tl.sum(tl.where(member, group_rstd[None, :], 0.0), axis=1)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c0 + cols, mask=col_mask, other=0.0).to(tl.float32)
    shift = -col_mean * scale
    if HAS_BIAS:
        shift += tl.load(b_ptr + c0 + cols, mask=col_mask, other=0.0).to(tl.float32)

    y = x.to(tl.float32) * scale[None, :] + shift[None, :]
    if APPLY_SILU:
        y = y * tl.sigmoid(y)
    tl.store(
        y_ptr + batch.to(tl.int64) * stride_yb + c0 + pos[:, None] * stride_yp + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


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


def _check_inputs(x, num_groups, weight, bias, eps, activation, out=None) -> None:
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
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"group_norm: x is on {x.device}; the kernel runs on CUDA, or on the CPU only when "
            f"TRITON_INTERPRET=1 is set before `kernels` is imported"
        )


def launch(
    x: torch.Tensor,
    num_groups: int,
    weight,
    bias,
    eps: float,
    activation,
    out: torch.Tensor,
    config: LaunchConfig | ChannelsLastConfig | None = None,
) -> None:
    """Run both kernels, writing into `out` (inputs as group_norm checks them). `config` overrides the
    chosen configuration (tests and benchmarks use it); its type picks the path: ChannelsLastConfig
    needs x and out with channel stride 1."""
    if out.numel() == 0:
        return
    if _spatial_stride(x) is None:
        x = x.contiguous()
    batch, channels, h, w = x.shape
    stride_xp = _spatial_stride(x)
    channels_contiguous = x.stride(1) == 1 and channels > 1 and stride_xp != 1
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if config is None and channels_contiguous and out.stride(1) == 1:
        sm_count = _sm_count(x.device.index or 0) if x.is_cuda else DEFAULT_SM_COUNT
        config = choose_channels_last_config(batch, channels, h * w, num_groups, sm_count)
    if isinstance(config, ChannelsLastConfig):
        _launch_channels_last(x, num_groups, weight, bias, eps, activation, out, config)
    else:
        _launch_per_group(x, num_groups, weight, bias, eps, activation, out, config)


def _launch_channels_last(x, num_groups, weight, bias, eps, activation, out, config: ChannelsLastConfig):
    batch, channels, h, w = x.shape
    cg = channels // num_groups
    partial = torch.empty((batch * num_groups, 3, config.split), dtype=torch.float32, device=x.device)
    common = dict(
        CG=cg,
        GROUPS_PER_CHUNK=config.groups_per_chunk,
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        BLOCK_G=config.block_g,
        num_warps=config.num_warps,
    )
    _group_norm_cl_stats_kernel[(batch * config.num_chunks, config.split)](
        x,
        partial,
        x.stride(0),
        _spatial_stride(x),
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
            x.stride(0),
            _spatial_stride(x),
            out.stride(0),
            _spatial_stride(out),
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


def _launch_per_group(x, num_groups, weight, bias, eps, activation, out, config: LaunchConfig | None):
    batch, channels, h, w = x.shape
    hw = h * w
    cg = channels // num_groups
    stride_xp = _spatial_stride(x)
    channels_contiguous = x.stride(1) == 1 and channels > 1 and stride_xp != 1
    if config is None:
        sm_count = _sm_count(x.device.index or 0) if x.is_cuda else DEFAULT_SM_COUNT
        config = choose_config(batch, cg, hw, num_groups, channels_contiguous, sm_count)

    partial = torch.empty((batch * num_groups, config.split, 3), dtype=torch.float32, device=x.device)
    _group_norm_stats_kernel[(batch * num_groups, config.split)](
        x,
        partial,
        x.stride(0),
        x.stride(1),
        stride_xp,
        cg,
        hw,
        num_groups,
        config.num_c_tiles,
        config.num_tiles,
        config.tiles_per_prog,
        config.split,
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        num_warps=config.num_warps,
    )
    for p0, tiles in _spatial_launches(hw, config.block_hw):
        _group_norm_apply_kernel[(batch * num_groups, tiles, config.num_c_tiles)](
            _at_position(x, p0),
            _at_position(out, p0),
            weight if weight is not None else x,
            bias if bias is not None else x,
            partial,
            x.stride(0),
            x.stride(1),
            stride_xp,
            out.stride(0),
            out.stride(1),
            _spatial_stride(out),
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
) -> torch.Tensor:
    out = torch.empty_like(x)
    launch(x, num_groups, weight, bias, eps, activation, out)
    return out


@_group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, activation):
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
) -> None:
    launch(x, num_groups, weight, bias, eps, activation, out)


@_group_norm_out_op.register_fake
def _group_norm_out_fake(x, num_groups, weight, bias, eps, activation, out):
    return None


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm over [B, C, H, W] (NCHW-contiguous or channels_last), then `activation` (None | "silu").

    Statistics are computed in fp32; the result has x's dtype and memory format. With `out`, the result
    is written there (any strides that flatten H and W) and `out` is returned.
    """
    _check_inputs(x, num_groups, weight, bias, eps, activation, out)
    if out is None:
        return torch.ops.sd_kernels.group_norm(x, num_groups, weight, bias, float(eps), activation)
    torch.ops.sd_kernels.group_norm_out(x, num_groups, weight, bias, float(eps), activation, out)
    return out


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Pure-torch GroupNorm(+SiLU). upcast=True computes in fp32 (fp64 stays fp64), then casts back."""
    compute = (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype
    y = F.group_norm(
        x.to(compute),
        num_groups,
        weight.to(compute) if weight is not None else None,
        bias.to(compute) if bias is not None else None,
        eps,
    )
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"group_norm_reference: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return y.to(x.dtype)


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
) -> list[aot.AotConfig]:
    if channels_last:
        config = choose_channels_last_config(batch, channels, hw, groups)
        if config is not None:
            return _aot_channels_last_configs(batch, channels, hw, groups, config, dtype, activation, affine)
    cg = channels // groups
    config = choose_config(batch, cg, hw, groups, channels_last)
    stride_c, stride_p = (1, channels) if channels_last else (hw, 1)
    common = dict(
        stride_xb=channels * hw, stride_xc=stride_c, stride_xp=stride_p, CG=cg, HW=hw, G=groups, SPLIT=config.split
    )
    stats_args = dict(
        common,
        x_ptr=dtype,
        partial_ptr=torch.float32,
        NUM_C_TILES=config.num_c_tiles,
        NUM_TILES=config.num_tiles,
        TILES_PER_PROG=config.tiles_per_prog,
    )
    apply_args = dict(
        common,
        x_ptr=dtype,
        y_ptr=dtype,
        w_ptr=dtype,
        b_ptr=dtype,
        partial_ptr=torch.float32,
        stride_yb=channels * hw,
        stride_yc=stride_c,
        stride_yp=stride_p,
        eps=1e-5,
    )
    apply_constexprs = dict(
        BLOCK_HW=config.block_hw,
        BLOCK_C=config.block_c,
        MAX_SPLIT=MAX_SPLIT,
        HAS_WEIGHT=affine,
        HAS_BIAS=affine,
        APPLY_SILU=activation == "silu",
    )
    return [
        aot.config(
            _group_norm_stats_kernel,
            stats_args,
            dict(BLOCK_HW=config.block_hw, BLOCK_C=config.block_c),
            config.num_warps,
            3,
            _COUNT_ARGS,
        ),
        aot.config(_group_norm_apply_kernel, apply_args, apply_constexprs, config.num_warps, 3, _COUNT_ARGS),
    ]


def _aot_channels_last_configs(
    batch, channels, hw, groups, config: ChannelsLastConfig, dtype, activation, affine
) -> list[aot.AotConfig]:
    common = dict(
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
    channels_last fallback variants; duplicates removed."""
    shapes = [(c, s * s) for c in _UNET_CHANNELS for s in _UNET_SIDES]
    shapes += [(c, s * s) for c in _VAE_CHANNELS for s in _VAE_SIDES]
    configs = []
    for batch in (1, 2):
        for channels, hw in shapes:
            for channels_last in (False, True):
                for dtype in SUPPORTED_DTYPES:
                    for activation in ACTIVATIONS:
                        configs += _aot_configs_for(batch, channels, hw, channels_last, dtype, activation, True)
    configs += _aot_configs_for(2, 320, 64 * 64, False, torch.float16, "silu", False)
    configs += _aot_configs_for(2, 320, 7 * 9, True, torch.float16, "silu", True)
    # A channels_last group wider than CHANNELS_LAST_MAX_WIDTH takes the per-group kernels.
    configs += _aot_configs_for(1, 640, 8 * 8, True, torch.float16, "silu", True, groups=1)
    return aot.unique(configs)
