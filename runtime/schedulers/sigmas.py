"""Sigma-schedule helpers shared by the Euler and DPM families, copied from diffusers' numpy code so the
float64/float32 mix (and therefore every value) is the same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose log-sigma interpolates to `sigma`."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(in_sigmas: np.ndarray, num_inference_steps: int, config: Mapping[str, Any]) -> np.ndarray:
    """Karras et al. (2022) rho=7 spacing between the schedule's (or the config's) sigma_min and sigma_max."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def spaced_timesteps_float(config: Mapping[str, Any], n: int) -> np.ndarray:
    """Euler-family timesteps (float32), for the three timestep_spacing modes."""
    T = config["num_train_timesteps"]
    if config["timestep_spacing"] == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if config["timestep_spacing"] == "leading":
        step_ratio = T // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
        timesteps += config["steps_offset"]
        return timesteps
    step_ratio = T / n
    timesteps = (np.arange(T, 0, -step_ratio)).round().copy().astype(np.float32)
    timesteps -= 1
    return timesteps
