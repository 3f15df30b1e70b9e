"""Scheduler configuration: diffusers' defaults per class, `from_config` key carry-over, validation.

A checkpoint's `scheduler/scheduler_config.json` names one diffusers class. Switching sampler the
diffusers way (`OtherScheduler.from_config(pipe.scheduler.config)`) keeps every key of the JSON that the
new class accepts, except the keys the JSON lists in `_use_default_values`, and uses the new class's own
defaults for the rest. `merged_config` reproduces exactly that, so e.g. DPM++ from an SD1 PNDM config
gets `steps_offset=1` from the JSON but DPM's own `timestep_spacing="linspace"`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_THRESHOLDING = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)

# The keyword defaults of each diffusers 0.42 scheduler __init__ (a test checks them against diffusers).
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        **_BETAS,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        **_THRESHOLDING,
        clip_sample_range=1.0,
        timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    ),
    "PNDMScheduler": dict(
        **_BETAS,
        skip_prk_steps=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    ),
    "EulerDiscreteScheduler": dict(
        **_BETAS,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        timestep_type="discrete",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    ),
    "EulerAncestralDiscreteScheduler": dict(
        **_BETAS,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    ),
    "DPMSolverMultistepScheduler": dict(
        **_BETAS,
        solver_order=2,
        prediction_type="epsilon",
        **_THRESHOLDING,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"),
        variance_type=None,
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    ),
    "LCMScheduler": dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        trained_betas=None,
        original_inference_steps=50,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        **_THRESHOLDING,
        timestep_spacing="leading",
        timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    ),
}

# Keys diffusers reads with `hasattr(self.config, ...)` although they are not __init__ arguments of the
# class: from_config registers every leftover JSON key on the config, so they still take effect.
_HIDDEN_KEYS = {"DPMSolverMultistepScheduler": ("sigma_min", "sigma_max")}


def merged_config(class_name: str, raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    """`class_name`'s defaults, updated from the raw JSON dict as diffusers' from_config does, then `overrides`."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"scheduler config must be a dict (scheduler_config.json), got {type(raw).__name__}")
    used_defaults = raw.get("_use_default_values") or []
    defaults = DIFFUSERS_DEFAULTS[class_name]
    accepted = set(defaults) | set(_HIDDEN_KEYS.get(class_name, ()))
    cfg = dict(defaults)
    cfg.update({k: v for k, v in raw.items() if k in accepted and k not in used_defaults})
    cfg.update(overrides)
    return MappingProxyType(cfg)


def check_choice(cfg: Mapping[str, Any], key: str, allowed: tuple) -> None:
    if cfg[key] not in allowed:
        raise ValueError(
            f"scheduler config field {key!r} has unsupported value {cfg[key]!r}; expected one of {allowed}"
        )


def check_unsupported(cfg: Mapping[str, Any], key: str, supported_value: Any) -> None:
    """Options diffusers has but this runtime does not implement: refuse rather than silently ignore."""
    if key in cfg and cfg[key] != supported_value:
        raise ValueError(
            f"scheduler config field {key!r}={cfg[key]!r} is not supported by this runtime (only {supported_value!r})"
        )


def check_common(cfg: Mapping[str, Any], prediction_types: tuple) -> None:
    """Validation shared by every family: training schedule, prediction type, timestep spacing."""
    n = cfg["num_train_timesteps"]
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"scheduler config field 'num_train_timesteps' must be an integer in "
            f"[2, {MAX_TRAIN_TIMESTEPS}], got {n!r:.40}"
        )
    offset = cfg.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < n:
        raise ValueError(
            f"scheduler config field 'steps_offset' must be an integer in [0, num_train_timesteps "
            f"= {n}), got {offset!r:.40}"
        )
    for key in _FLAGS:
        if key in cfg and not isinstance(cfg[key], bool):
            raise ValueError(f"scheduler config field {key!r} must be true or false, got {cfg[key]!r:.40}")
    if cfg["trained_betas"] is None:
        check_choice(cfg, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        for key in ("beta_start", "beta_end"):
            if not _is_beta(cfg[key]):
                raise ValueError(
                    f"scheduler config field {key!r} must be a finite number in (0, 1) (a "
                    f"noise variance per step), got {cfg[key]!r:.40}"
                )
    elif not isinstance(cfg["trained_betas"], (list, tuple)) or len(cfg["trained_betas"]) != n:
        count = len(cfg["trained_betas"]) if isinstance(cfg["trained_betas"], (list, tuple)) else "no"
        raise ValueError(f"scheduler config field 'trained_betas' has {count} values, but num_train_timesteps is {n}")
    elif not all(_is_beta(beta) for beta in cfg["trained_betas"]):
        bad = next(i for i, beta in enumerate(cfg["trained_betas"]) if not _is_beta(beta))
        raise ValueError(
            f"scheduler config field 'trained_betas' entry {bad} is "
            f"{cfg['trained_betas'][bad]!r:.40}; every beta must be a finite number in (0, 1)"
        )
    check_choice(cfg, "prediction_type", prediction_types)
    check_choice(cfg, "timestep_spacing", ("linspace", "leading", "trailing"))
    check_unsupported(cfg, "thresholding", False)


# Diffusers' schedules use 1000; a bound keeps a config from allocating tables of any size.
MAX_TRAIN_TIMESTEPS = 100_000
# Boolean fields of the supported families (the JSON "no" or 0 would otherwise read as true / false).
_FLAGS = (
    "clip_sample",
    "set_alpha_to_one",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
    "lower_order_final",
    "euler_at_final",
    "thresholding",
    "skip_prk_steps",
)


def _is_beta(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The squaredcos_cap_v2 (cosine) schedule, in float64 Python math as diffusers computes it."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: Mapping[str, Any], pin_terminal: bool = False) -> torch.Tensor:
    """Cumulative alpha products of the training schedule, float32 like diffusers.

    pin_terminal: Euler and DPM set the last value to 2**-24 under zero-terminal-SNR so sigma stays finite.
    """
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _betas_for_alpha_bar(n)
    rescale = cfg.get("rescale_betas_zero_snr", False)
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale and pin_terminal:
        cumprod[-1] = 2**-24
    # Where a broken schedule shows first: every later sigma and step is a function of this table.
    positive = cumprod[:-1] if rescale else cumprod  # zero-terminal-SNR makes the last one 0 on purpose
    if not bool(torch.isfinite(cumprod).all()) or not bool((positive > 0).all()):
        raise ValueError(
            f"scheduler config (beta_schedule {cfg.get('beta_schedule')!r}, beta_start "
            f"{cfg.get('beta_start')!r}, beta_end {cfg.get('beta_end')!r}, num_train_timesteps {n}) "
            f"gives a table of alphas_cumprod with NaN, inf or 0 values: its sigmas would not "
            f"be finite"
        )
    return cumprod


def check_timesteps_in_range(timesteps: torch.Tensor, cfg: Mapping[str, Any], n: int) -> None:
    """Refuse a schedule that reaches past the last trained timestep: "leading" spacing adds
    steps_offset to multiples of num_train_timesteps // n, so e.g. 1000 steps with offset 1 ask for
    timestep 1000 of a 0..999 table (diffusers fails there with an IndexError)."""
    last = cfg["num_train_timesteps"] - 1
    if len(timesteps) and float(timesteps.max()) > last:
        offset = cfg.get("steps_offset", 0)
        fits = [m for m in range(1, n) if (m - 1) * ((last + 1) // m) + offset <= last]
        hint = f"; use at most {fits[-1]} steps" if fits else ""
        raise ValueError(
            f"steps={n} with timestep_spacing={cfg.get('timestep_spacing')!r} and steps_offset="
            f"{offset} reaches timestep {float(timesteps.max()):g}, past the last trained timestep "
            f"{last}{hint}"
        )
