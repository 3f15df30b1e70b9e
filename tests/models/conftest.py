"""Helpers for the model parity tests: perturbed random weights and a relative-error check."""
import random

import pytest
import torch


def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Move every parameter away from its default init, in place.

    Vectors (norm weights at 1, biases often at 0) get absolute noise of `scale`, so a swapped or
    missing norm/bias shows; matrices and kernels get noise of `scale` times their own RMS, so the
    network keeps its activation scale and stays numerically well-conditioned at full size.
    """
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.dim() > 1:
                rms = param.pow(2).mean().sqrt().item()
                noise *= scale * (rms if rms > 0 else 1.0)
            else:
                noise *= scale
            param.add_(noise)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|; the shapes must match exactly."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), "reference output is not finite"
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh generator per test with a new seed every run (its `initial_seed()` reproduces a failure)."""
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**63))
