"""Euler and Euler ancestral ("Euler a"), matching diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler (s_churn = 0, the pipelines' default)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Scheduler
from .config import check_choice, check_common, check_unsupported
from .sigmas import karras_sigmas, sigma_to_t, spaced_timesteps_float


class Euler(Scheduler):
    name = "euler"
    _pins_terminal_snr = True
    _prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")

    def __init__(self, config):
        check_common(config, self._prediction_types)
        self._check_options(config)
        super().__init__(config)
        self.sigmas: torch.Tensor | None = None

    @staticmethod
    def _check_options(config) -> None:
        check_choice(config, "interpolation_type", ("linear", "log_linear"))
        check_choice(config, "final_sigmas_type", ("zero", "sigma_min"))
        check_choice(config, "timestep_type", ("discrete", "continuous"))
        check_unsupported(config, "use_exponential_sigmas", False)
        check_unsupported(config, "use_beta_sigmas", False)

    def _schedule(self, n: int) -> None:
        cfg = self.config
        timesteps = spaced_timesteps_float(cfg, n)
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(sigmas)
        if cfg.get("interpolation_type", "linear") == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        else:
            sigmas = torch.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), n + 1).exp().numpy()
        if cfg.get("use_karras_sigmas", False):
            sigmas = karras_sigmas(sigmas, n, cfg)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        if cfg.get("final_sigmas_type", "zero") == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        if cfg.get("timestep_type") == "continuous" and cfg["prediction_type"] == "v_prediction":
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]])
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32))
        self.sigmas = sigmas
        max_sigma = sigmas.max()
        if cfg["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float((max_sigma**2 + 1) ** 0.5)

    def _tables(self) -> dict[str, list]:
        rows: dict[str, list] = {k: [] for k in ("input_div", "sigma", "v_out", "v_in_div", "dt", "noise_sigma")}
        for i in range(len(self.timesteps)):
            sigma = self.sigmas[i]
            sigma_hat = sigma * (0.0 + 1)  # gamma = 0: no churn
            rows["input_div"].append((sigma**2 + 1) ** 0.5)
            rows["sigma"].append(sigma_hat)
            rows["v_out"].append(-sigma / (sigma**2 + 1) ** 0.5)
            rows["v_in_div"].append(sigma**2 + 1)
            rows["dt"].append(self.sigmas[i + 1] - sigma_hat)
            rows["noise_sigma"].append(sigma)
        return rows

    def scale_model_input(self, sample: torch.Tensor, i) -> torch.Tensor:
        return sample / self._t["input_div"][i]

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i) -> torch.Tensor:
        self._require_timesteps()
        sigma = self._t["noise_sigma"].to(device=original.device, dtype=original.dtype)[i]
        return original + noise * sigma

    def _pred_original(self, model_output: torch.Tensor, i, sample: torch.Tensor) -> torch.Tensor:
        tb = self._t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - tb["sigma"][i] * model_output
        if kind == "v_prediction":
            return model_output * tb["v_out"][i] + (sample / tb["v_in_div"][i])
        return model_output

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, noise=None) -> torch.Tensor:
        sample = sample.to(torch.float32)
        pred_original_sample = self._pred_original(model_output, i, sample)
        derivative = (sample - pred_original_sample) / self._t["sigma"][i]
        prev_sample = sample + derivative * self._t["dt"][i]
        return prev_sample.to(model_output.dtype)


class EulerAncestral(Euler):
    """Euler a: step down to sigma_down deterministically, then add fresh noise of size sigma_up."""

    name = "euler_a"
    _prediction_types = ("epsilon", "v_prediction")

    @staticmethod
    def _check_options(config) -> None:
        pass

    def _tables(self) -> dict[str, list]:
        rows = super()._tables()
        rows["dt"], rows["sigma_up"] = [], []
        for i in range(len(self.timesteps)):
            sigma_from = self.sigmas[i]
            sigma_to = self.sigmas[i + 1]
            sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            rows["dt"].append(sigma_down - sigma_from)
            rows["sigma_up"].append(sigma_up)
        return rows

    def _draws_noise(self, i: int) -> bool:
        return True

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, noise=None) -> torch.Tensor:
        self._require_noise(noise)
        sample = sample.to(torch.float32)
        pred_original_sample = self._pred_original(model_output, i, sample)
        derivative = (sample - pred_original_sample) / self._t["sigma"][i]
        prev_sample = sample + derivative * self._t["dt"][i]
        prev_sample = prev_sample + noise * self._t["sigma_up"][i]
        return prev_sample.to(model_output.dtype)
