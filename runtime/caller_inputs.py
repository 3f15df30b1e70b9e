"""What a caller may hand a pipeline run instead of the pipeline making it: its own generator, initial
latents or prompt embeddings, and the form of the output. diffusers-style calls (runtime/diffusers_compat.py)
build one; Pipeline._run takes it with the request. Its own module so that neither of those two imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CallerInputs:
    """What a caller may hand a run instead of the pipeline making it (runtime/diffusers_compat.py)."""

    generator: torch.Generator | None = None  # a CPU generator, instead of one seeded from the request's seed
    latents: torch.Tensor | None = None  # txt2img's initial noise [B, 4, h, w], before init_noise_sigma
    context: torch.Tensor | None = None  # the encoded prompts ([uncond; cond] when guided), B rows
    output: str = "pil"  # "pil" images with metadata, "tensor" [B, 3, H, W] in [0, 1], "latent"
