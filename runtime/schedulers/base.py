"""What every sampler shares: the step-count bookkeeping, img2img start, up-front noise, coefficient tables.

Design rule for all samplers: `set_timesteps` computes every per-step coefficient once (as diffusers
would compute it at that step, same dtype and order of operations, on the CPU) and stores them as 1-D
tensors on the target device indexed by the step index i. `step` then does plain tensor math with
`table[i]` and never branches on tensor values, so a CUDA-graph runner can pass i as a device tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from .config import alphas_cumprod, check_timesteps_in_range


class Scheduler:
    """Base class; subclasses implement `_schedule`, `_tables`, `step` and optionally the hooks below."""

    name: str = ""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config, pin_terminal=self._pins_terminal_snr)
        self.timesteps: torch.Tensor | None = None
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None  # the count asked for (PNDM runs one more)
        self.begin_index = 0
        self.device = torch.device("cpu")
        self._t: dict[str, torch.Tensor] = {}
        self._needs_noise = False

    _pins_terminal_snr = False

    # ---- the public API -------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        self._require_timesteps()
        return len(self.timesteps)

    @property
    def needs_noise(self) -> bool:
        self._require_timesteps()
        return self._needs_noise

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device = "cpu") -> None:
        n = num_inference_steps
        check_steps(n, self.config["num_train_timesteps"], name="num_inference_steps")
        self.num_inference_steps = n
        self.device = torch.device(device)
        self._schedule(n)
        check_timesteps_in_range(self.timesteps, self.config, n)
        self.timesteps = self.timesteps.to(self.device)
        self.begin_index = 0
        self._rebuild()

    def img2img_start(self, strength: float) -> int:
        """First step index for img2img (diffusers' `get_timesteps`); also makes that the begin index.

        Multistep warm-up and ancestral noise draws then start at that index, as in diffusers, where
        get_timesteps calls `set_begin_index` (PNDM simply starts counting at its first step).
        """
        self._require_timesteps()
        return self.start_at(img2img_start_index(strength, self.num_inference_steps))

    def start_at(self, index: int) -> int:
        """Make step `index` the first one run (diffusers' set_begin_index; SDXL's denoising_start)."""
        self._require_timesteps()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_steps:
            raise ValueError(f"begin index must be an int in [0, {self.num_steps}), got {index!r}")
        self.begin_index = index
        self._rebuild()
        return index

    def draw_noise(
        self, generator: torch.Generator | None, shape, dtype: torch.dtype, device, end: int | None = None
    ) -> torch.Tensor | None:
        """All per-step noise [S, *shape], drawn in the order diffusers draws it inside its loop.

        Rows of steps that draw nothing (before the begin index, from `end` on: a run stopped early, as
        SDXL's base before its refiner; LCM's last step) stay zero and consume no random numbers. Like
        diffusers' randn_tensor, a CPU generator draws on the CPU.
        """
        if not self.needs_noise:
            return None
        shape = tuple(shape)
        noise = torch.zeros((self.num_steps, *shape), dtype=dtype, device=device)
        rand_device = generator.device if generator is not None else torch.device(device)
        for i in range(self.begin_index, self.num_steps if end is None else end):
            if self._draws_noise(i):
                noise[i] = torch.randn(shape, generator=generator, dtype=dtype, device=rand_device).to(device)
        return noise

    def scale_model_input(self, sample: torch.Tensor, i) -> torch.Tensor:
        return sample

    def reset(self) -> None:
        """Forget multistep history before a new image (tables stay). Zeroes the history buffers in
        place: a captured CUDA graph reads those very tensors, and is reset this way before each replay."""

    def clone(self) -> Scheduler:
        """An independent copy: same schedule and tables, its own history buffers."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict) -> Scheduler:
        # The config is an immutable MappingProxyType, which deepcopy cannot pickle: share it.
        memo[id(self.config)] = self.config
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        """DDPM forward noising to the level of timesteps[i] (DDIM, PNDM, LCM; Euler/DPM override)."""
        self._require_timesteps()
        ac = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        t = self.timesteps[i].to(original.device)
        sqrt_alpha_prod = ac[t] ** 0.5
        sqrt_one_minus_alpha_prod = (1 - ac[t]) ** 0.5
        return sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise

    # ---- hooks for the families -------------------------------------------------------------------
    def _schedule(self, n: int) -> None:
        """Set self.timesteps (CPU, diffusers' values and dtype) and any schedule arrays such as sigmas."""
        raise NotImplementedError

    def _tables(self) -> dict[str, list]:
        """Per-step coefficients as lists of 0-d CPU tensors / floats, one entry per step index."""
        raise NotImplementedError

    def _draws_noise(self, i: int) -> bool:
        return False

    # ---- helpers ----------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        tables = self._tables()
        self._t = {k: _stack(v).to(self.device) for k, v in tables.items()}
        self._needs_noise = any(self._draws_noise(i) for i in range(self.begin_index, self.num_steps))
        self.reset()

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")

    def _require_noise(self, noise: torch.Tensor | None) -> None:
        if noise is None:
            raise ValueError(f"{self.name} is ancestral: pass noise=draw_noise(...)[i] to step()")

    @staticmethod
    def _history(buffer: torch.Tensor | None, like: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """A zeroed history buffer shaped like `like` (or [rows, *like.shape]), kept across steps."""
        shape = like.shape if rows is None else (rows, *like.shape)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return buffer


def check_steps(steps, train_timesteps: int, name: str = "steps") -> None:
    """The rule for a step count, shared by the pipeline's request checks and set_timesteps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    if steps > train_timesteps:
        raise ValueError(f"{name}={steps} exceeds the scheduler's num_train_timesteps={train_timesteps}")


def img2img_start_index(strength, steps: int) -> int:
    """diffusers' get_timesteps: the first of `steps` step indices that img2img at `strength` runs.
    The one rule for strength, shared by the pipeline's request checks and Scheduler.img2img_start."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step "
            f"(int(steps * strength) = 0); raise steps or strength"
        )
    return steps - init_timestep


def _stack(values: list) -> torch.Tensor:
    """A 1-D table from per-step values: bools stay bool (for torch.where), numbers become float32."""
    if all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).reshape(-1)
