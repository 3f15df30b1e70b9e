"""Triton kernels for the UNet's hot layers. Imports nothing from runtime/.

Each op lives in its own file beside a pure-torch reference and is registered as a torch custom op.

The ops load lazily, on first attribute access: transformers probes for Hugging Face's unrelated
`kernels` package by importing whatever `kernels` resolves to, so importing this package must be cheap
and must never fail (no triton import, no op registration) until an op is actually asked for.
"""
import importlib

_OPS = {
    "attention": "kernels.attention",
    "attention_reference": "kernels.attention",
    "group_norm": "kernels.group_norm",
    "group_norm_reference": "kernels.group_norm",
}

__all__ = sorted(_OPS)


def __getattr__(name: str):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
