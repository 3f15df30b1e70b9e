"""DDIM (deterministic, eta = 0), matching diffusers' DDIMScheduler step by step."""

from __future__ import annotations

import numpy as np
import torch

from .base import Scheduler
from .config import check_common


class DDIM(Scheduler):
    name = "ddim"

    def __init__(self, config):
        check_common(config, ("epsilon", "sample", "v_prediction"))
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _schedule(self, n: int) -> None:
        cfg, T = self.config, self.config["num_train_timesteps"]
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            step_ratio = T // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:
            step_ratio = T / n
            timesteps = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
            timesteps -= 1
        self.timesteps = torch.from_numpy(timesteps)

    def _tables(self) -> dict[str, list]:
        eta = 0.0
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        rows: dict[str, list] = {"sqrt_a": [], "sqrt_b": [], "sqrt_a_prev": [], "direction": []}
        for t in self.timesteps.tolist():
            prev_t = t - stride
            alpha_prod_t = self.alphas_cumprod[t]
            alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
            std_dev_t = eta * variance ** (0.5)
            rows["sqrt_a"].append(alpha_prod_t ** (0.5))
            rows["sqrt_b"].append(beta_prod_t ** (0.5))
            rows["sqrt_a_prev"].append(alpha_prod_t_prev ** (0.5))
            rows["direction"].append((1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5))
        return rows

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, noise=None) -> torch.Tensor:
        tb = self._t
        sqrt_a, sqrt_b = tb["sqrt_a"][i], tb["sqrt_b"][i]
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            pred_original_sample = (sample - sqrt_b * model_output) / sqrt_a
            pred_epsilon = model_output
        elif kind == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - sqrt_a * pred_original_sample) / sqrt_b
        else:
            pred_original_sample = sqrt_a * sample - sqrt_b * model_output
            pred_epsilon = sqrt_a * model_output + sqrt_b * sample
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            pred_original_sample = pred_original_sample.clamp(-limit, limit)
        return tb["sqrt_a_prev"][i] * pred_original_sample + tb["direction"][i] * pred_epsilon
