"""Module substitution: how a backend swaps kernels into a model without the model knowing."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Replacement = tuple[nn.Module, str, nn.Module]  # (parent, attribute name, the module it held before)


def rebind(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` instance sharing `module`'s state (Parameters, buffers, flags, hooks): the same layer
    computed by another implementation, with identical state-dict keys."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    return new


def replace_modules(
    model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
) -> list[Replacement]:
    """Replace every submodule for which `match` holds by `make(old)`; return what was replaced, so a
    caller can put it back (`restore_modules`)."""
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                replaced.append((parent, name, child))
    return replaced


def restore_modules(replaced: list[Replacement]) -> None:
    """Undo `replace_modules`."""
    for parent, name, child in replaced:
        setattr(parent, name, child)
