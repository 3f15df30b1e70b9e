"""Triton kernels for the UNet's hot layers. Imports nothing from runtime/.

Each op lives in its own file beside a pure-torch reference and is registered as a torch custom op.

transformers probes for Hugging Face's unrelated `kernels` package by importing whatever `kernels`
resolves to, so this import must never raise: without triton the ops are simply absent, and asking
for one says why.
"""
try:
    from kernels.attention import attention, attention_reference
    from kernels.geglu import geglu, geglu_reference
    from kernels.group_norm import group_norm, group_norm_reference
except ImportError as _err:
    _IMPORT_ERROR = _err

    def __getattr__(name: str):
        raise AttributeError(f"kernels.{name} is unavailable: {_IMPORT_ERROR} (the kernels need `triton`)")

__all__ = ["attention", "attention_reference", "geglu", "geglu_reference", "group_norm", "group_norm_reference"]
