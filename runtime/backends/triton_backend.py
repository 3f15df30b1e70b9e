"""The `triton` backend: our GroupNorm and attention kernels swapped into the UNet and the VAE."""

from __future__ import annotations

import torch

from runtime.backends.fused_qkv import fuse_qkv
from runtime.models.blocks import GEGLU
from runtime.models.layers import AttentionCore, GroupNorm
from runtime.models.substitution import rebind, replace_modules


def prepare_triton(components, *, channels_last: bool = True):
    try:
        from runtime.backends.triton_gemm import fuse_output_gemms
        from runtime.backends.triton_layers import TritonAttentionCore, TritonGEGLU, TritonGroupNorm
        from runtime.backends.triton_resnet import substitute_resnets
        from runtime.backends.triton_transformer import fuse_layer_norms
    except ImportError as err:
        raise RuntimeError(
            f"the triton backend needs the `triton` package ({err}); "
            "install it with `pip install triton` or use backend='torch'"
        ) from err
    for model in (components.unet, components.vae):
        fuse_qkv(model)  # self-attention's q, k, v as one GEMM
        fuse_layer_norms(model)  # transformer blocks: each residual add and the LayerNorm after it, one kernel
        fuse_output_gemms(model)  # Transformer2D: proj_out and its residual add, one GEMM
        # Exact types: a module that is already kernel-backed is not replaced twice.
        replace_modules(model, lambda m: type(m) is GroupNorm, lambda old: rebind(old, TritonGroupNorm))
        replace_modules(model, lambda m: type(m) is AttentionCore, lambda old: rebind(old, TritonAttentionCore))
        replace_modules(model, lambda m: type(m) is GEGLU, lambda old: rebind(old, TritonGEGLU))
        substitute_resnets(model)  # bias and time adds folded (runtime/backends/triton_resnet.py)
        if channels_last:
            # Convolutions are fastest in NHWC on tensor cores; our GroupNorm kernel reads either layout.
            model.to(memory_format=torch.channels_last)
    return components
