"""Triton kernels for the UNet's hot layers. Imports nothing from runtime/.

Each op lives in its own file beside a pure-torch reference and is registered as a torch custom op.
"""
from kernels.attention import attention, attention_reference
from kernels.group_norm import group_norm, group_norm_reference

__all__ = ["attention", "attention_reference", "group_norm", "group_norm_reference"]
