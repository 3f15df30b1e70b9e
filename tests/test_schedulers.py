"""Our samplers against diffusers' schedulers, step by step, on real SD scheduler configs.

Both sides are driven like StableDiffusionPipeline drives a scheduler, with the same fake "UNet" (a
fixed function of the input and the timestep) and the same generator seed for ancestral noise; the
latents after every step must agree to 1e-6 relative (in practice they are bit-identical).
"""

import inspect
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from runtime.schedulers import SCHEDULER_NAMES, make_scheduler
from runtime.schedulers.config import DIFFUSERS_DEFAULTS

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD1 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2 (768-v): Euler, v-prediction, no timestep_spacing key (Euler default linspace)
SD2_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1: DDIM, v-prediction
SD21_DDIM = dict(SD2_EULER, _class_name="DDIMScheduler", _diffusers_version="0.8.0")

CONFIGS = {
    "sd1": SD1,
    "sd1_v": dict(SD1, prediction_type="v_prediction"),
    "sd2_euler_v": SD2_EULER,
    "sd21_ddim_v": SD21_DDIM,
    # zero-terminal-SNR recipe: trailing spacing, rescaled betas, v-prediction
    "zero_snr_trailing_v": dict(SD21_DDIM, timestep_spacing="trailing", rescale_betas_zero_snr=True),
    # options only some classes read. (Heun with a sigma_min final sigma is NaN in diffusers under
    # Karras sigmas, whose last two sigmas coincide, so the two options are tested apart.)
    "sd1_sigma_min_linspace": dict(SD1, final_sigmas_type="sigma_min", timestep_spacing="linspace"),
    "sd1_heun_trailing": dict(SD1, solver_type="heun", timestep_spacing="trailing"),
    "cosine_linear_v": dict(SD2_EULER, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
}

# Our name -> the diffusers class and from_config overrides that define it.
DIFFUSERS_EQUIVALENT = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False),
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    "lcm": ("LCMScheduler", {}),
}

SHAPE = (2, 4, 8, 8)
MAX_RELATIVE_ERROR = 1e-6


def reference_scheduler(name, config):
    """What a diffusers user gets: load the checkpoint's class, then `Other.from_config(pipe.scheduler.config)`."""
    native = getattr(diffusers, config["_class_name"]).from_config(config)
    class_name, overrides = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, class_name).from_config(native.config, **overrides)


def fake_unet(sample, t, direction):
    """A deterministic stand-in for the UNet: depends on the input and the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.3 * sample + 0.1 * torch.sin(t / 37.0 + 0.5) * direction


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


def run_reference(ref, latents, direction, seed, start=0):
    # Without a begin index diffusers looks the first timestep up by value and, when it is repeated
    # (cosine + Karras at few steps gives [998, 998, ...]), starts at index 1 and runs off the end.
    # We always step by index, so pin diffusers' begin index as img2img's get_timesteps does.
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    step_kwargs = {}
    if "generator" in inspect.signature(ref.step).parameters:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    trajectory = []
    for t in ref.timesteps[start:]:
        model_input = ref.scale_model_input(latents, t)
        latents = ref.step(fake_unet(model_input, t, direction), t, latents, **step_kwargs).prev_sample
        trajectory.append(latents)
    return trajectory


def run_ours(sched, latents, direction, seed, start=0, index=int):
    noise = sched.draw_noise(torch.Generator().manual_seed(seed), latents.shape, latents.dtype, "cpu")
    trajectory = []
    for i in range(start, sched.num_steps):
        model_input = sched.scale_model_input(latents, index(i))
        model_output = fake_unet(model_input, sched.timesteps[i], direction)
        latents = sched.step(model_output, index(i), latents, None if noise is None else noise[i])
        trajectory.append(latents)
    return trajectory


def assert_trajectories_match(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype
        err = relative_error(a, b)
        assert err <= MAX_RELATIVE_ERROR, f"step {step}: relative error {err:.3g}"


def random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("steps", [1, 4, 14, 25])
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_txt2img_matches_diffusers_step_by_step(name, config_name, steps):
    config = CONFIGS[config_name]
    ref = reference_scheduler(name, config)
    ours = make_scheduler(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)

    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.num_steps == len(ref.timesteps)
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    if hasattr(ref, "sigmas"):
        assert torch.equal(ours.sigmas, ref.sigmas)

    noise, direction = random_inputs(steps)
    latents = noise * ours.init_noise_sigma
    seed = 1000 + steps
    assert_trajectories_match(run_ours(ours, latents, direction, seed), run_reference(ref, latents, direction, seed))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_half_precision_latents_match_diffusers(name):
    """The GPU pipeline steps fp16 latents: dtype handling (fp32 upcasts, noise dtype) must match too."""
    ref = reference_scheduler(name, SD1)
    ours = make_scheduler(name, SD1)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    noise, direction = random_inputs(11)
    latents = (noise * ours.init_noise_sigma).half()
    theirs = run_reference(ref, latents, direction.half(), seed=12)
    mine = run_ours(ours, latents, direction.half(), seed=12)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a.dtype == b.dtype == torch.float16
        assert relative_error(a.float(), b.float()) <= 1e-3


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_config_carry_over_matches_diffusers_from_config(name, config_name):
    ref = reference_scheduler(name, CONFIGS[config_name])
    ours = make_scheduler(name, CONFIGS[config_name])
    class_name = DIFFUSERS_EQUIVALENT[name][0]
    for key in DIFFUSERS_DEFAULTS[class_name]:
        assert ours.config[key] == ref.config[key], key


def test_config_saved_by_recent_diffusers_honours_use_default_values():
    """Keys listed in `_use_default_values` were never chosen by the author: the new class's defaults win."""
    saved = dict(diffusers.PNDMScheduler.from_config(SD1).config)
    assert "timestep_spacing" in saved["_use_default_values"]
    ref = diffusers.DPMSolverMultistepScheduler.from_config(saved)
    ours = make_scheduler("dpmpp_2m", saved)
    assert ours.config["timestep_spacing"] == ref.config.timestep_spacing == "linspace"
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_native_class_is_the_default():
    assert make_scheduler(None, SD1).name == "pndm"
    assert make_scheduler(None, SD2_EULER).name == "euler"
    assert make_scheduler(None, SD21_DDIM).name == "ddim"
    karras = dict(SD1, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    assert make_scheduler(None, karras).name == "dpmpp_2m_karras"


def test_our_defaults_are_diffusers_defaults():
    for class_name, defaults in DIFFUSERS_DEFAULTS.items():
        signature = inspect.signature(getattr(diffusers, class_name).__init__)
        theirs = {k: p.default for k, p in signature.parameters.items() if k != "self"}
        assert defaults == theirs, class_name


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(name, steps, strength):
    config = SD1 if name != "euler" else SD2_EULER
    ref = reference_scheduler(name, config)
    ours = make_scheduler(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, strength, "cpu")
    start = ours.img2img_start(strength)
    assert torch.equal(ours.timesteps[start:], timesteps)

    clean, direction = random_inputs(7)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    noisy_ref = ref.add_noise(clean, noise, timesteps[:1].repeat(SHAPE[0]))
    noisy = ours.add_noise(clean, noise, start)
    assert relative_error(noisy, noisy_ref) <= MAX_RELATIVE_ERROR

    seed = 77
    ours_traj = run_ours(ours, noisy, direction, seed, start=start)
    assert_trajectories_match(ours_traj, run_reference(ref, noisy_ref, direction, seed, start=start))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_step_index_may_be_a_device_tensor(name):
    """A CUDA-graph runner indexes the coefficient tables with a tensor; results must not change."""
    sched = make_scheduler(name, SD1)
    sched.set_timesteps(6)
    noise, direction = random_inputs(3)
    by_int = run_ours(sched, noise, direction, seed=5)
    sched.reset()
    by_tensor = run_ours(sched, noise, direction, seed=5, index=torch.tensor)
    for a, b in zip(by_int, by_tensor):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m"])
def test_reset_forgets_multistep_history(name):
    sched = make_scheduler(name, SD1)
    sched.set_timesteps(8)
    noise, direction = random_inputs(4)
    first = run_ours(sched, noise, direction, seed=1)
    sched.reset()
    second = run_ours(sched, noise, direction, seed=1)
    assert torch.equal(first[-1], second[-1])


def test_noise_is_drawn_only_for_steps_that_use_it():
    lcm = make_scheduler("lcm", SD1)
    lcm.set_timesteps(1)
    assert not lcm.needs_noise and lcm.draw_noise(torch.Generator(), SHAPE, torch.float32, "cpu") is None
    lcm.set_timesteps(4)
    drawn = lcm.draw_noise(torch.Generator().manual_seed(0), SHAPE, torch.float32, "cpu")
    assert drawn.shape == (4, *SHAPE) and torch.count_nonzero(drawn[3]) == 0
    g = torch.Generator().manual_seed(0)
    for i in range(3):  # diffusers draws one tensor per non-final step, in order
        assert torch.equal(drawn[i], torch.randn(SHAPE, generator=g))
    euler = make_scheduler("euler", SD1)
    euler.set_timesteps(4)
    assert euler.draw_noise(torch.Generator(), SHAPE, torch.float32, "cpu") is None


# ---- bad input -----------------------------------------------------------------------------------
def test_zero_steps_rejected():
    sched = make_scheduler("euler", SD1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown scheduler name 'heun'.*dpmpp_2m_karras"):
        make_scheduler("heun", SD1)


def test_unknown_class_without_name_is_explained():
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        make_scheduler(None, dict(SD1, _class_name="HeunDiscreteScheduler"))


@pytest.mark.parametrize(
    "field, value", [("beta_schedule", "foo"), ("prediction_type", "x0"), ("timestep_spacing", "middle")]
)
def test_unknown_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        make_scheduler("ddim", dict(SD1, **{field: value}))


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler("pndm", dict(SD1, skip_prk_steps=False))
    with pytest.raises(ValueError, match="algorithm_type"):
        make_scheduler(None, dict(SD1, _class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"))
    with pytest.raises(ValueError, match="thresholding"):
        make_scheduler("ddim", dict(SD1, thresholding=True))


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_strength_outside_unit_interval_rejected(strength):
    sched = make_scheduler("ddim", SD1)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="strength"):
        sched.img2img_start(strength)


def test_ancestral_step_without_noise_rejected():
    sched = make_scheduler("euler_a", SD1)
    sched.set_timesteps(3)
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        sched.step(sample, 0, sample)
