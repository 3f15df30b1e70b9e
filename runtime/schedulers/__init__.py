"""The samplers, numerically matching diffusers' schedulers step by step.

sched = make_scheduler(name, scheduler_config_json_dict)   # name None: the config's own class
sched.set_timesteps(steps, device)
noise = sched.draw_noise(generator, latents.shape, latents.dtype, device)   # None unless ancestral
for i in range(start, sched.num_steps):          # start = 0, or sched.img2img_start(strength)
    eps = unet(sched.scale_model_input(latents, i), sched.timesteps[i], context)
    latents = sched.step(eps, i, latents, None if noise is None else noise[i])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Scheduler, check_steps, img2img_start_index
from .config import merged_config
from .ddim import DDIM
from .dpm import DPMSolverPP2M
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .pndm import PNDM

# name -> (diffusers class whose defaults apply, our class, config keys the name itself fixes).
# The one table of samplers: names, diffusers' class names and the CLI's choices all derive from it.
_BY_NAME: dict[str, tuple[str, type[Scheduler], dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", DDIM, {}),
    "pndm": ("PNDMScheduler", PNDM, {}),
    "euler": ("EulerDiscreteScheduler", Euler, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", EulerAncestral, {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        DPMSolverPP2M,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False),
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        DPMSolverPP2M,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    "lcm": ("LCMScheduler", LCM, {}),
}
SCHEDULER_NAMES = tuple(_BY_NAME)
# A diffusers class name -> our name for a checkpoint's own scheduler (Karras sigmas: see config_name).
_NATIVE_CLASSES = {entry[0]: name for name, entry in _BY_NAME.items() if not entry[2].get("use_karras_sigmas")}


def diffusers_equivalent(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers scheduler class name, from_config overrides) that make diffusers run sampler `name`:
    the reference the bench's diffusers row and the parity tests switch to."""
    class_name, _, overrides = _BY_NAME[name]
    return class_name, dict(overrides)


def config_name(config: Mapping[str, Any]) -> str:
    """Our name for the sampler a scheduler_config.json describes (its class, and Karras sigmas); the
    class name itself where we do not implement it, "unknown" where the config names none."""
    class_name = config.get("_class_name", "")
    name = _NATIVE_CLASSES.get(class_name, class_name or "unknown")
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


def make_scheduler(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    """A sampler configured from a checkpoint's scheduler_config.json dict.

    With a name, it behaves like diffusers' `NamedScheduler.from_config(config)`: the checkpoint's beta
    schedule, prediction type, steps_offset... carry over; keys the new class lacks use its defaults.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a dict (scheduler_config.json), got {type(config).__name__}")
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in _NATIVE_CLASSES:
            raise ValueError(
                f"scheduler config '_class_name' {class_name!r} is not one this runtime implements "
                f"({sorted(_NATIVE_CLASSES)}); pass a scheduler name from {SCHEDULER_NAMES}"
            )
        diffusers_class, cls, _ = _BY_NAME[_NATIVE_CLASSES[class_name]]
        overrides = {}  # the checkpoint's own class: its config decides everything
    elif name in _BY_NAME:
        diffusers_class, cls, overrides = _BY_NAME[name]
    else:
        raise ValueError(f"unknown scheduler name {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    return cls(merged_config(diffusers_class, config, overrides))


__all__ = [
    "SCHEDULER_NAMES",
    "Scheduler",
    "check_steps",
    "config_name",
    "diffusers_equivalent",
    "img2img_start_index",
    "make_scheduler",
    "DDIM",
    "PNDM",
    "Euler",
    "EulerAncestral",
    "DPMSolverPP2M",
    "LCM",
]
