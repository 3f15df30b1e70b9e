"""The samplers, numerically matching diffusers' schedulers step by step.

    sched = make_scheduler(name, scheduler_config_json_dict)   # name None: the config's own class
    sched.set_timesteps(steps, device)
    noise = sched.draw_noise(generator, latents.shape, latents.dtype, device)   # None unless ancestral
    for i in range(start, sched.num_steps):          # start = 0, or sched.img2img_start(strength)
        eps = unet(sched.scale_model_input(latents, i), sched.timesteps[i], context)
        latents = sched.step(eps, i, latents, None if noise is None else noise[i])
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import Scheduler
from .config import merged_config
from .ddim import DDIM
from .dpm import DPMSolverPP2M
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .pndm import PNDM

SCHEDULER_NAMES = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm")

# name -> (diffusers class whose defaults apply, our class, config keys the name itself fixes)
_BY_NAME: dict[str, tuple[str, type[Scheduler], dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", DDIM, {}),
    "pndm": ("PNDMScheduler", PNDM, {}),
    "euler": ("EulerDiscreteScheduler", Euler, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", EulerAncestral, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", DPMSolverPP2M,
                 dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", DPMSolverPP2M,
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "lcm": ("LCMScheduler", LCM, {}),
}
_NATIVE_CLASSES = {entry[0]: name for name, entry in _BY_NAME.items() if name != "dpmpp_2m_karras"}


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


__all__ = ["SCHEDULER_NAMES", "Scheduler", "make_scheduler", "DDIM", "PNDM", "Euler", "EulerAncestral",
           "DPMSolverPP2M", "LCM"]
