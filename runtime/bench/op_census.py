"""Count what a network costs on a GPU without running it: every op with its FLOPs, bytes and launches.

`count_ops(fn)` runs `fn` on meta tensors (shapes, strides and dtypes, no storage) and records one
`OpRecord` per launching op through a TorchDispatchMode. Nothing is computed, so the full-size networks
run in seconds on the CPU. Our kernels' custom ops run their fake implementations on meta tensors (they
serve the Meta key), so the triton backend's kernels are counted without a GPU; their launchers refuse
non-CUDA tensors unless TRITON_INTERPRET=1, so `count_ops` sets that for the duration of a count (no
kernel is reached, interpreted or not).

What is modelled, and how (every figure derived from this is a model, not a measurement):
- FLOPs are matrix FLOPs only (2 per multiply-add: convolutions, GEMMs, attention), from torch's own
  `flop_counter` formulas, plus our formulas for the ops torch does not know. Elementwise and
  normalisation arithmetic is left out: at fp16 each such op is bound by its bytes.
- Bytes: each tensor argument read once (its distinct elements: a broadcast bias counts once), each
  output written once; the exceptions are in `_CUSTOM` (kernels that read an input twice, and GroupNorm,
  whose launches and reads follow the path kernels/group_norm.py's own `plan` picks for the shape).
- Launches: one per op, except views and allocations (none) and the entries of `_EXTRA_LAUNCHES`.
- Convolution outputs are channels_last where the input or the weight is, as cuDNN lays them out (meta
  convolutions return NCHW), so layout-dependent paths (1x1 convs as GEMMs) follow the GPU's.
- `F.scaled_dot_product_attention` is recorded as the single fused kernel CUDA runs (flash or
  memory-efficient), not as the math decomposition a CPU build falls back to.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from kernels import group_norm

DEVICE = "meta"

# Ops that launch nothing and move nothing: allocations, aliasing reshapes, metadata.
_FREE_OPS = frozenset(
    {
        "aten.empty",
        "aten.empty_strided",
        "aten.empty_like",
        "aten._unsafe_view",
        "aten.lift_fresh",
        "aten.detach",
        "aten.alias",
        "aten.resize_",
    }
)
# Ops that CUDA runs as more than one kernel (op -> launches), with the reason.
_EXTRA_LAUNCHES = {
    # RowwiseMoments, ComputeFusedParams, then the elementwise apply (ATen GroupNormKernel.cu).
    "aten.native_group_norm": 3,
}
# Named categories for the report, by op name; anything else is "other".
_CATEGORIES = {
    "aten.convolution": "conv",
    "aten.mm": "gemm",
    "aten.addmm": "gemm",
    "aten.bmm": "gemm",
    "aten.baddbmm": "gemm",
    "sd_kernels.attention": "attention",
    "sd_kernels.attention_out": "attention",
    "sdpa": "attention",
    "aten.native_group_norm": "norm",
    "sd_kernels.group_norm": "norm",
    "sd_kernels.group_norm_out": "norm",
    "aten.native_layer_norm": "norm",
    "sd_kernels.layer_norm": "norm",
    "sd_kernels.add_layer_norm": "norm",
    "sd_kernels.geglu": "geglu",
    "sd_kernels.linear_geglu": "gemm",
    "sd_kernels.linear_bias_residual": "gemm",
    "aten.gelu": "elementwise",
    "aten.silu": "elementwise",
    "aten.add": "elementwise",
    "aten.mul": "elementwise",
    "aten.sub": "elementwise",
    "aten.div": "elementwise",
    "aten.copy_": "copy",
    "aten.clone": "copy",
    "aten._to_copy": "copy",
    "aten.cat": "copy",
}


@dataclass(frozen=True)
class OpRecord:
    """One launching op of a run (an aten op, one of our kernels, or a fused attention)."""

    op: str  # "aten.convolution", "sd_kernels.group_norm", "sdpa", ... (overload dropped)
    shapes: str  # input shapes, e.g. "2x320x64x64 320x320x3x3": groups identical ops in reports
    category: str  # conv | gemm | attention | norm | geglu | elementwise | copy | other
    flops: int  # matrix FLOPs (2 per multiply-add)
    bytes_read: int
    bytes_written: int
    launches: int

    def as_dict(self) -> dict:
        return asdict(self)


def _bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches: broadcast (stride-0) dimensions count once."""
    elements = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elements * t.element_size() if t.numel() else 0


def _tensors(tree) -> list[torch.Tensor]:
    seen, tensors = set(), []
    for leaf in tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            tensors.append(leaf)
    return tensors


def _shapes(tensors: list[torch.Tensor]) -> str:
    return " ".join("x".join(map(str, t.shape)) or "scalar" for t in tensors)


def attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """q k^T and p v: 2 * B*H * Nq * Nk * (D + Dv) (no causal skipping: 77 tokens are one key block)."""
    *batch, n_q, d = q.shape
    return 2 * math.prod(batch) * n_q * k.shape[-2] * (d + v.shape[-1])


def _attention_cost(args, out):
    q, k, v = args[:3]
    written = out if out is not None else args[3]
    return attention_flops(q, k, v), _bytes(q) + _bytes(k) + _bytes(v), _bytes(written), 1


def _group_norm_cost(args, out):
    # The path the launcher takes, from its own `plan`: the one-pass kernel reads x once in one launch;
    # the split kernels read it twice (stats, then apply). y is written once; weight, bias, shift read once.
    x, num_groups, weight, bias = args[:4]
    if out is None:  # sd_kernels.group_norm_out(x, num_groups, weight, bias, eps, activation, out, shift)
        out, shift = args[6], (args[7] if len(args) > 7 else None)
    else:  # sd_kernels.group_norm(x, num_groups, weight, bias, eps, activation, shift)
        shift = args[6] if len(args) > 6 else None
    launches, reads = group_norm.launches_and_reads(group_norm.plan(x, num_groups, out), x.shape[2] * x.shape[3])
    params = sum(_bytes(t) for t in (weight, bias, shift) if t is not None)
    return 0, reads * _bytes(x) + params, _bytes(out), launches


def _geglu_cost(args, out):
    # One pass: the [.., 2C] projection read once, [.., C] written (kernels/geglu.py).
    return 0, _bytes(args[0]), _bytes(out), 1


def _fused_linear_cost(args, out):
    # kernels/fused_linear.py: one GEMM launch; x, weight, bias (and the residual) read once, only the
    # output written (the GEGLU halves and the pre-residual sum stay in registers). Matrix FLOPs only,
    # as for every op here: the epilogue's arithmetic is bound by its bytes.
    x, weight = args[:2]
    rows = math.prod(x.shape[:-1])
    reads = sum(_bytes(t) for t in args[:4] if isinstance(t, torch.Tensor))
    return 2 * rows * weight.shape[0] * weight.shape[1], reads, _bytes(out), 1


def _layer_norm_cost(args, out):
    # One pass: each row read once (held in registers for both statistics passes), y written once.
    x, weight, bias = args[:3]
    params = sum(_bytes(t) for t in (weight, bias) if t is not None)
    return 0, _bytes(x) + params, _bytes(x), 1


def _add_layer_norm_cost(args, out):
    # One pass: x and the update read once; the sum s (the new residual stream) and y = LN(s) written.
    x, update, weight, bias = args[:4]
    params = sum(_bytes(t) for t in (weight, bias) if t is not None)
    return 0, _bytes(x) + _bytes(update) + params, 2 * _bytes(x), 1


# Our kernels' custom ops: op -> (args, out or None) -> (flops, bytes read, bytes written, launches).
_CUSTOM: dict[str, Callable] = {
    "sd_kernels.attention": _attention_cost,
    "sd_kernels.attention_out": _attention_cost,
    "sd_kernels.group_norm": _group_norm_cost,
    "sd_kernels.group_norm_out": _group_norm_cost,
    "sd_kernels.geglu": _geglu_cost,
    "sd_kernels.linear_geglu": _fused_linear_cost,
    "sd_kernels.linear_bias_residual": _fused_linear_cost,
    "sd_kernels.layer_norm": _layer_norm_cost,
    "sd_kernels.add_layer_norm": _add_layer_norm_cost,
}


def _op_name(func) -> str:
    return f"{func.namespace}.{func._opname}"


class _RecordOps(TorchDispatchMode):
    """Appends an OpRecord for every launching op; runs each op on the meta tensors."""

    def __init__(self, records: list[OpRecord]):
        super().__init__()
        self.records = records

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name == "aten.convolution":
            out = _cudnn_layout(out, args[0], args[1])
        if func.namespace == "prim" or name in _FREE_OPS or _is_view(func):
            return out
        inputs = _tensors((args, kwargs))
        shapes = _shapes(inputs)
        category = _CATEGORIES.get(name, "other")
        if name in _CUSTOM:
            flops, read, written, launches = _CUSTOM[name](args, out if isinstance(out, torch.Tensor) else None)
            self.records.append(OpRecord(name, shapes, category, flops, read, written, launches))
            return out
        outputs = _tensors(out)
        flop_formula = flop_registry.get(func._overloadpacket)
        flops = int(flop_formula(*args, **kwargs, out_val=out)) if flop_formula else 0
        read = sum(_bytes(t) for t in inputs)
        written = sum(_bytes(t) for t in outputs)
        bias = args[2] if name == "aten.convolution" else None
        if isinstance(bias, torch.Tensor):
            # cuDNN convolutions take no bias: ATen adds it in a second kernel, output read and rewritten.
            self.records.append(OpRecord(name, shapes, category, flops, read - _bytes(bias), written, 1))
            self.records.append(
                OpRecord("aten.convolution.bias_add", shapes, "elementwise", 0, written + _bytes(bias), written, 1)
            )
            return out
        self.records.append(OpRecord(name, shapes, category, flops, read, written, _EXTRA_LAUNCHES.get(name, 1)))
        return out


def _cudnn_layout(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The convolution's output laid out as cuDNN returns it: channels_last when the input or the weight
    is (meta convolutions return NCHW whatever they are given). Free: meta tensors have no storage."""
    channels_last = torch.channels_last
    if out.dim() == 4 and (
        x.is_contiguous(memory_format=channels_last) or weight.is_contiguous(memory_format=channels_last)
    ):
        return torch.empty_like(out, memory_format=channels_last)
    return out


def _is_view(func) -> bool:
    """Ops whose output aliases an input without writing it (view, transpose, expand, split, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention as the one fused kernel CUDA runs: recorded here, its output an
    empty tensor laid out as the fused kernels return it ([B, N, H, D] memory, a free merge of heads)."""

    def __init__(self, records: list[OpRecord]):
        super().__init__()
        self.records = records

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if kwargs.get("attn_mask") is not None or len(args) > 3:
            raise NotImplementedError("census: scaled_dot_product_attention with a mask is not modelled")
        *batch, n_q, _ = q.shape
        out = torch.empty((*batch[:1], n_q, *batch[1:], v.shape[-1]), dtype=q.dtype, device=q.device)
        out = out.transpose(1, 2) if q.dim() == 4 else out
        self.records.append(
            OpRecord(
                "sdpa",
                _shapes([q, k, v]),
                "attention",
                attention_flops(q, k, v),
                _bytes(q) + _bytes(k) + _bytes(v),
                _bytes(out),
                1,
            )
        )
        return out


@contextlib.contextmanager
def _kernels_accept_meta():
    """Let the kernel launchers' device checks pass meta tensors. TRITON_INTERPRET also decides, when
    `kernels` is imported, whether kernels compile or are interpreted: so `kernels` is imported first,
    under the process's own setting, and the variable is restored afterwards."""
    import kernels  # noqa: F401  (never raises; without triton the kernels are simply absent)

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def count_ops(fn: Callable[[], object]) -> list[OpRecord]:
    """Run `fn()` on meta tensors and return the ops it launched, in order."""
    records: list[OpRecord] = []
    with torch.no_grad(), _kernels_accept_meta(), _FusedAttention(records), _RecordOps(records):
        fn()
    return records
