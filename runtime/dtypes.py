"""Precision names: the one table every place that takes a dtype by name reads (load, CLI, bench, export).

A precision has one short name (`PRECISIONS`) and a few spellings users write (`DTYPES`); code that needs
a subset (ONNX export: fp32 and fp16) names the subset by short names and looks the dtypes up here.
"""

from __future__ import annotations

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {
    **PRECISIONS,
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch.float16 or a name ("fp16", "float16", "half", "bf16", "fp32", "torch.float32", ...) -> dtype.
    Raises ValueError naming the valid choices."""
    if isinstance(dtype, torch.dtype):
        if dtype in PRECISIONS.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(PRECISIONS)}")
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; valid names: {', '.join(DTYPES)}")


def precision_name(dtype: str | torch.dtype) -> str:
    """The short name ("fp32", "fp16", "bf16") of a dtype or any of its spellings."""
    resolved = parse_dtype(dtype)
    return next(name for name, value in PRECISIONS.items() if value == resolved)
