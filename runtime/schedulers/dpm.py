"""DPM-Solver++ 2M (multistep, second order; optionally Karras sigmas), matching diffusers'
DPMSolverMultistepScheduler with algorithm_type="dpmsolver++".

Each step is   x_next = c_sample*x - c_x0*x0 - c_d1*(r*(x0 - x0_prev))
with x0 the data prediction of this step and x0_prev that of the previous one. First-order steps
(warm-up, lower_order_final, the final step to sigma 0) have c_d1 = r = 0, which subtracts an exact
zero, so both orders share one formula and the per-step choice lives in the tables.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Scheduler
from .config import check_choice, check_common, check_unsupported
from .sigmas import karras_sigmas, sigma_to_t


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


class DPMSolverPP2M(Scheduler):
    _pins_terminal_snr = True

    @property
    def name(self) -> str:
        return "dpmpp_2m_karras" if self.config["use_karras_sigmas"] else "dpmpp_2m"

    def __init__(self, config):
        check_common(config, ("epsilon", "sample", "v_prediction"))
        check_choice(config, "algorithm_type", ("dpmsolver++",))
        check_choice(config, "solver_order", (1, 2))
        check_choice(config, "solver_type", ("midpoint", "heun"))
        check_choice(config, "final_sigmas_type", ("zero", "sigma_min"))
        for key in (
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ):
            check_unsupported(config, key, False)
        check_unsupported(config, "variance_type", None)
        super().__init__(config)
        alpha_t = torch.sqrt(self.alphas_cumprod)
        sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        self.sigmas: torch.Tensor | None = None
        self._prev_x0: torch.Tensor | None = None

    def _schedule(self, n: int) -> None:
        cfg, T = self.config, self.config["num_train_timesteps"]
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg["lambda_min_clipped"])
        last_timestep = (T - clipped_idx).numpy().item()
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:
            step_ratio = T / n
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
            timesteps -= 1

        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = np.flip(sigmas).copy()
            sigmas = karras_sigmas(sigmas, n, cfg)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg["final_sigmas_type"] == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(dtype=torch.int64)

    def _order(self, i: int) -> int:
        """1 or 2: the solver order diffusers uses at step i (its lower_order_* rules)."""
        cfg, steps = self.config, len(self.timesteps)
        lower_order_final = i == steps - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and steps < 15) or cfg["final_sigmas_type"] == "zero"
        )
        warm = i - self.begin_index >= 1  # diffusers' lower_order_nums >= 1
        if cfg["solver_order"] == 1 or not warm or lower_order_final:
            return 1
        return 2

    def _tables(self) -> dict[str, list]:
        rows: dict[str, list] = {k: [] for k in ("alpha", "sigma", "c_sample", "c_x0", "c_d1", "r_inv")}
        for i in range(len(self.timesteps)):
            alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
            alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
            lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
            lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
            h = lambda_t - lambda_s0
            rows["alpha"].append(alpha_s0)
            rows["sigma"].append(sigma_s0)
            rows["c_sample"].append(sigma_t / sigma_s0)
            rows["c_x0"].append(alpha_t * (torch.exp(-h) - 1.0))
            if self._order(i) == 1:
                rows["c_d1"].append(0.0)
                rows["r_inv"].append(0.0)
                continue
            alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            rows["r_inv"].append(1.0 / r0)
            if self.config["solver_type"] == "midpoint":
                rows["c_d1"].append(0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
            else:  # heun adds alpha_t*((e^-h - 1)/h + 1)*D1; subtracting its negation is bit-identical
                rows["c_d1"].append(-(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)))
        return rows

    def reset(self) -> None:
        if self._prev_x0 is not None:
            self._prev_x0.zero_()

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, noise=None) -> torch.Tensor:
        tb = self._t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - tb["sigma"][i] * model_output) / tb["alpha"][i]
        elif kind == "v_prediction":
            x0 = tb["alpha"][i] * sample - tb["sigma"][i] * model_output
        else:
            x0 = model_output
        self._prev_x0 = self._history(self._prev_x0, x0)
        d1 = tb["r_inv"][i] * (x0 - self._prev_x0)
        self._prev_x0.copy_(x0)
        sample = sample.to(torch.float32)
        prev_sample = tb["c_sample"][i] * sample - tb["c_x0"][i] * x0 - tb["c_d1"][i] * d1
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        self._require_timesteps()
        sigma = self.sigmas.to(device=original.device, dtype=original.dtype)[i]
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return alpha_t * original + sigma_t * noise
