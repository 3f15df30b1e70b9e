"""Where a network's weights live, so a CUDA-graph cache can tell when its graphs went stale.

A graph reads every weight by the address it had at capture. Writes into the same memory (a LoRA merge
`copy_`, `load_state_dict`) keep the graphs valid and are seen by the next replay; anything that puts a
weight in new memory leaves them reading freed memory: `.to()` / `.half()` (every Parameter's `.data`
is replaced, and the fused q/k/v and stacked cross-attention K/V weights are concatenated again), an
assigned `.data`, an upcast VAE put back. Comparing the addresses before each replay catches all of
these, wherever they come from, instead of a list of call sites that must each remember to drop graphs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> tuple:
    """(address, dtype, shape) of every parameter, buffer and plain tensor attribute (a fused weight
    kept beside its Parameters) of `modules` and their submodules, in a fixed order. Host-side only:
    no device sync."""
    stamp = []
    for module in modules:
        for sub in module.modules():
            tensors = [*sub._parameters.values(), *sub._buffers.values()]
            tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
            stamp += [(t.data_ptr(), t.dtype, t.shape) for t in tensors if t is not None]
    return tuple(stamp)


def torch_modules(*networks) -> list[torch.nn.Module]:
    """The networks that are torch modules (an exported backend's stand-ins hold their weights elsewhere)."""
    return [n for n in networks if isinstance(n, torch.nn.Module)]
