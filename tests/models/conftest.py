"""Helpers for the model parity tests: perturbed random weights and a relative-error check."""

import random

import pytest
import torch

from runtime.bench import presets


def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Move every parameter away from its default init, in place (runtime.bench.presets.perturb_): vectors
    get absolute noise of `scale`, matrices and kernels `scale` times their own RMS."""
    presets.perturb_(module, generator, relative=scale, absolute=scale)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|; the shapes must match exactly."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), "reference output is not finite"
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh generator per test with a new seed every run (its `initial_seed()` reproduces a failure)."""
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**63))
