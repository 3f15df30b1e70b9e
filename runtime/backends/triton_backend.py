"""The `triton` backend: our GroupNorm and attention kernels swapped into the UNet and the VAE."""
from __future__ import annotations

import torch

from runtime.backends.substitute import replace_modules
from runtime.models.layers import AttentionCore, GroupNorm


def prepare_triton(components, *, channels_last: bool = True):
    try:
        from runtime.backends.triton_layers import TritonAttentionCore, TritonGroupNorm
    except ImportError as err:
        raise RuntimeError(f"the triton backend needs the `triton` package ({err}); "
                           "install it with `pip install triton` or use backend='torch'") from err
    for model in (components.unet, components.vae):
        replace_modules(model, GroupNorm, TritonGroupNorm.from_module)
        replace_modules(model, AttentionCore, lambda old: TritonAttentionCore(old.upcast))
        if channels_last:
            # Convolutions are fastest in NHWC on tensor cores; our GroupNorm kernel reads either layout.
            model.to(memory_format=torch.channels_last)
    return components
