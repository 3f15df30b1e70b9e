"""Module substitution: how a backend swaps kernels into a model without the model knowing."""
from __future__ import annotations

from typing import Callable

from torch import nn


def replace_modules(model: nn.Module, target: type[nn.Module],
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule that is exactly of type `target` by `make(old)`; return the count.

    Exact type match, so a module that is already a kernel-backed subclass is not replaced twice.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is target:
                setattr(parent, name, make(child))
                replaced += 1
    return replaced
