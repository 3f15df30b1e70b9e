"""PNDM in its PLMS form (skip_prk_steps=True, what every SD checkpoint ships), matching diffusers.

diffusers' PLMS keeps a python list of past model outputs and branches on a counter; here the counter
is known per step at set_timesteps, so each step is one fixed linear combination
    combined = ((w0*eps + w1*h0) + w2*h1 + w3*h2) * mul / div
of the new output and the last three stored ones (h0 newest), with the weights, the history shift and
the "reuse the first sample" flag tabulated per step. Zero weights on finite history add exact zeros,
and mul/div reproduce diffusers' `(1/24) * (...)` versus `(...) / 12`, so the result is bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Scheduler
from .config import check_common

# (w0, w1, w2, w3, mul, div) for the Adams-Bashforth combination once `n` outputs are stored.
_PLMS_WEIGHTS = {
    1: (1.0, 0.0, 0.0, 0.0, 1.0, 1.0),
    2: (3.0, -1.0, 0.0, 0.0, 1.0, 2.0),
    3: (23.0, -16.0, 5.0, 0.0, 1.0, 12.0),
    4: (55.0, -59.0, 37.0, -9.0, 1 / 24, 1.0),
}
# The second step averages the first output with its own (a Heun-like warm-up at the same timestep).
_SECOND_STEP_WEIGHTS = (1.0, 1.0, 0.0, 0.0, 1.0, 2.0)


class PNDM(Scheduler):
    name = "pndm"

    def __init__(self, config):
        check_common(config, ("epsilon", "v_prediction"))
        if not config["skip_prk_steps"]:
            raise ValueError(
                "scheduler config field 'skip_prk_steps'=False (PNDM's Runge-Kutta warm-up) is not supported; "
                "Stable Diffusion configs use skip_prk_steps=True (PLMS)"
            )
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self._ets: torch.Tensor | None = None
        self._first_sample: torch.Tensor | None = None

    def _schedule(self, n: int) -> None:
        cfg, T = self.config, self.config["num_train_timesteps"]
        if cfg["timestep_spacing"] == "linspace":
            base = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            base = (np.arange(0, n) * (T // n)).round()
            base += cfg["steps_offset"]
        else:
            base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64)
            base -= 1
        # PLMS repeats the second-highest timestep: the warm-up pair runs at it twice.
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        self.timesteps = torch.from_numpy(plms.astype(np.int64))

    def _tables(self) -> dict[str, list]:
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        rows: dict[str, list] = {
            k: []
            for k in (
                "w0",
                "w1",
                "w2",
                "w3",
                "mul",
                "div",
                "push",
                "keep_first",
                "use_first",
                "sqrt_a",
                "sqrt_b",
                "sample_coeff",
                "alpha_gap",
                "denominator",
            )
        }
        stored = 0  # how many outputs diffusers' `ets` list holds after this step
        for i, t in enumerate(self.timesteps.tolist()):
            counter = i - self.begin_index
            prev_t = t - stride
            if counter == 1:
                prev_t, t = t, t + stride
                weights = _SECOND_STEP_WEIGHTS
            else:
                stored = min(stored + 1, 4) if counter >= 0 else 0
                weights = _PLMS_WEIGHTS[max(stored, 1)]
            for key, value in zip(("w0", "w1", "w2", "w3", "mul", "div"), weights):
                rows[key].append(value)
            rows["push"].append(counter != 1)
            rows["keep_first"].append(counter == 0)
            rows["use_first"].append(counter == 1)

            alpha_prod_t = self.alphas_cumprod[t]
            alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            rows["sqrt_a"].append(alpha_prod_t**0.5)
            rows["sqrt_b"].append(beta_prod_t**0.5)
            rows["sample_coeff"].append((alpha_prod_t_prev / alpha_prod_t) ** (0.5))
            rows["alpha_gap"].append(alpha_prod_t_prev - alpha_prod_t)
            rows["denominator"].append(
                alpha_prod_t * beta_prod_t_prev ** (0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
            )
        return rows

    def reset(self) -> None:
        if self._ets is not None:
            self._ets.zero_()
            self._first_sample.zero_()

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, noise=None) -> torch.Tensor:
        tb = self._t
        self._ets = self._history(self._ets, model_output, rows=3)
        self._first_sample = self._history(self._first_sample, sample)
        ets, first = self._ets, self._first_sample

        combined = tb["w0"][i] * model_output + tb["w1"][i] * ets[0]
        combined = (combined + tb["w2"][i] * ets[1] + tb["w3"][i] * ets[2]) * tb["mul"][i] / tb["div"][i]
        sample_in = torch.where(tb["use_first"][i], first, sample)
        first.copy_(torch.where(tb["keep_first"][i], sample, first))
        ets.copy_(torch.where(tb["push"][i], torch.stack([model_output, ets[0], ets[1]]), ets))

        if self.config["prediction_type"] == "v_prediction":
            combined = tb["sqrt_a"][i] * combined + tb["sqrt_b"][i] * sample_in
        return tb["sample_coeff"][i] * sample_in - tb["alpha_gap"][i] * combined / tb["denominator"][i]
