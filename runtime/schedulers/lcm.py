"""Latent Consistency Model sampling, matching diffusers' LCMScheduler (txt2img schedule, strength 1).

Each step maps x_t to the consistency function's estimate `denoised`, then re-noises it to the next
timestep with fresh noise (not after the last step): next = k_denoised*denoised + k_noise*noise, with
k_denoised = 1 and k_noise = 0 on the last step, which reproduces diffusers' `prev = denoised` exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Scheduler
from .config import check_common


class LCM(Scheduler):
    name = "lcm"

    def __init__(self, config):
        check_common(config, ("epsilon", "sample", "v_prediction"))
        original = config["original_inference_steps"]
        if (
            isinstance(original, bool)
            or not isinstance(original, int)
            or not 1 <= original <= config["num_train_timesteps"]
        ):
            raise ValueError(
                f"scheduler config field 'original_inference_steps' must be an integer in "
                f"[1, num_train_timesteps={config['num_train_timesteps']}], got {original!r}"
            )
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _schedule(self, n: int) -> None:
        original_steps = self.config["original_inference_steps"]
        if n > original_steps:
            raise ValueError(
                f"num_inference_steps={n} exceeds the LCM config's original_inference_steps={original_steps}"
            )
        k = self.config["num_train_timesteps"] // original_steps
        lcm_origin_timesteps = np.asarray(list(range(1, int(original_steps * 1.0) + 1))) * k - 1
        lcm_origin_timesteps = lcm_origin_timesteps[::-1].copy()
        inference_indices = np.linspace(0, len(lcm_origin_timesteps), num=n, endpoint=False)
        inference_indices = np.floor(inference_indices).astype(np.int64)
        self.timesteps = torch.from_numpy(lcm_origin_timesteps[inference_indices]).to(dtype=torch.long)

    def _tables(self) -> dict[str, list]:
        rows: dict[str, list] = {k: [] for k in ("sqrt_a", "sqrt_b", "c_skip", "c_out", "k_denoised", "k_noise")}
        steps = len(self.timesteps)
        sigma_data = 0.5
        for i in range(steps):
            timestep = self.timesteps[i].cpu()
            prev_timestep = self.timesteps[i + 1].cpu() if i + 1 < steps else timestep
            alpha_prod_t = self.alphas_cumprod[timestep]
            alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            scaled_timestep = timestep * self.config["timestep_scaling"]
            rows["c_skip"].append(sigma_data**2 / (scaled_timestep**2 + sigma_data**2))
            rows["c_out"].append(scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5)
            rows["sqrt_a"].append(alpha_prod_t.sqrt())
            rows["sqrt_b"].append(beta_prod_t.sqrt())
            last = i == steps - 1
            rows["k_denoised"].append(1.0 if last else alpha_prod_t_prev.sqrt())
            rows["k_noise"].append(0.0 if last else beta_prod_t_prev.sqrt())
        return rows

    def _draws_noise(self, i: int) -> bool:
        return i != len(self.timesteps) - 1

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, noise=None) -> torch.Tensor:
        tb = self._t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            predicted_original_sample = (sample - tb["sqrt_b"][i] * model_output) / tb["sqrt_a"][i]
        elif kind == "sample":
            predicted_original_sample = model_output
        else:
            predicted_original_sample = tb["sqrt_a"][i] * sample - tb["sqrt_b"][i] * model_output
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            predicted_original_sample = predicted_original_sample.clamp(-limit, limit)
        denoised = tb["c_out"][i] * predicted_original_sample + tb["c_skip"][i] * sample
        if not self.needs_noise:  # a single-step schedule: nothing is ever re-noised
            return denoised
        self._require_noise(noise)
        return tb["k_denoised"][i] * denoised + tb["k_noise"][i] * noise
