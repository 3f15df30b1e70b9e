"""runtime/pipeline.py against diffusers' Stable Diffusion pipelines on small random-weight models.

Same folder, same seed, same scheduler: our images must be within 35 dB PSNR of diffusers' (uint8).
"""

import json
import math
import shutil
import warnings

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

import runtime
from runtime import images as imageio
from runtime.images import psnr
from runtime.pipeline import GenerationCancelled
from runtime.schedulers import diffusers_equivalent
from tests import seeding
from tests.model_factory import save_diffusers_folder

MIN_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("sd1") / "model", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("sd2") / "model", kind="sd2", seed=1)


@pytest.fixture(scope="module")
def inpaint9_folder(sd1_folder, tmp_path_factory):
    """The SD1 folder with a 9-channel inpainting UNet (random weights, perturbed off init)."""
    folder = tmp_path_factory.mktemp("sd1_inpaint") / "model"
    shutil.copytree(sd1_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["in_channels"] = 9
    with seeding.global_rng(3):
        unet = UNet2DConditionModel(**config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    return folder


_loaded = {}


def ours(folder):
    if folder not in _loaded:
        _loaded[folder] = runtime.load(folder, backend="torch", device="cpu", dtype=torch.float32)
    return _loaded[folder]


_references = {}


def reference(cls, folder, scheduler=None):
    """diffusers' pipeline `cls` on `folder` (loaded once per folder), with the named scheduler."""
    if folder not in _references:
        base = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
        )
        _references[folder] = base.components
    pipe = cls(**_references[folder])
    if scheduler is not None:
        # Assigned after construction, as users switch samplers: the pipeline's __init__ would otherwise
        # "fix" some config values (e.g. DDIM's clip_sample) that from_config leaves as they are.
        class_name, overrides = diffusers_equivalent(scheduler)
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed):
    return torch.Generator("cpu").manual_seed(seed)


def assert_close_images(our_images, reference_images):
    assert len(our_images) == len(reference_images)
    for mine, theirs in zip(our_images, reference_images):
        assert mine.size == theirs.size
        value = psnr(mine, theirs)
        assert value >= MIN_PSNR_DB, f"PSNR {value:.1f} dB < {MIN_PSNR_DB} dB"


def random_picture(width, height, seed):
    """A smooth image (VAE-friendly), not noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)


def box_mask(width, height):
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return PIL.Image.fromarray(mask, mode="L")


# ---------------------------------------------------------------- txt2img parity
@pytest.mark.parametrize("scheduler", [None, "ddim", "euler_a", "dpmpp_2m_karras"])
def test_txt2img_matches_diffusers_sd1(sd1_folder, scheduler):
    # None: the checkpoint's own (PNDM); a negative prompt, 2 images, a non-square size.
    kwargs = dict(negative_prompt="blurry, low quality", guidance=7.5, width=64, height=48)
    mine = ours(sd1_folder).generate(
        "a red fox in the snow", steps=3, seed=7, num_images=2, scheduler=scheduler, progress=False, **kwargs
    )
    theirs = reference(StableDiffusionPipeline, sd1_folder, scheduler)(
        "a red fox in the snow",
        negative_prompt=kwargs["negative_prompt"],
        num_inference_steps=3,
        guidance_scale=7.5,
        width=64,
        height=48,
        num_images_per_prompt=2,
        generator=generator(7),
    ).images
    assert_close_images(mine, theirs)
    assert mine[0].size == (64, 48)
    assert psnr(mine[0], mine[1]) < 30  # two different samples, not one image twice


@pytest.mark.parametrize("scheduler", [None, "euler", "dpmpp_2m", "lcm"])
def test_txt2img_matches_diffusers_sd2(sd2_folder, scheduler):
    # Two prompts (each repeated num_images times), v-prediction model, native size.
    prompts = ["a lighthouse at dusk", "a bowl of ramen"]
    mine = ours(sd2_folder).generate(prompts, steps=2, seed=11, guidance=5.0, scheduler=scheduler, progress=False)
    theirs = reference(StableDiffusionPipeline, sd2_folder, scheduler)(
        prompts, num_inference_steps=2, guidance_scale=5.0, generator=generator(11)
    ).images
    assert_close_images(mine, theirs)
    assert mine[0].size == ours(sd2_folder).native_size()


def test_txt2img_fp16_matches_diffusers(sd1_folder):
    # 40x24 px = 3x5 latents: a size where CPU fp16 randn differs from fp32 randn cast to fp16, so
    # the initial noise must be drawn in the model dtype, as diffusers' randn_tensor does.
    mine = runtime.load(sd1_folder, dtype="fp16").generate(
        "a red fox", steps=2, seed=7, width=40, height=24, scheduler="euler_a", progress=False
    )
    pipe = StableDiffusionPipeline.from_pretrained(
        sd1_folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float16
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = pipe("a red fox", num_inference_steps=2, width=40, height=24, generator=generator(7)).images
    assert_close_images(mine, theirs)


def test_txt2img_without_guidance_matches_diffusers(sd1_folder):
    mine = ours(sd1_folder).generate("a cat", steps=2, seed=3, guidance=1.0, scheduler="euler_a", progress=False)
    theirs = reference(StableDiffusionPipeline, sd1_folder, "euler_a")(
        "a cat", num_inference_steps=2, guidance_scale=1.0, generator=generator(3)
    ).images
    assert_close_images(mine, theirs)


def test_guidance_runs_the_unet_once_per_step_on_the_doubled_batch(sd1_folder):
    pipe = ours(sd1_folder)
    batch_sizes = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        pipe.generate("a cat", steps=2, seed=0, num_images=2, guidance=7.5, scheduler="ddim", progress=False)
        pipe.generate("a cat", steps=2, seed=0, num_images=2, guidance=1.0, scheduler="ddim", progress=False)
    finally:
        handle.remove()
    assert batch_sizes == [4, 4, 2, 2]


def test_denoise_step_takes_guidance_as_a_device_scalar(sd1_folder):
    # The CUDA-graph runner keeps guidance in a 0-d buffer; the step must give the same latents.
    from runtime.schedulers import make_scheduler

    pipe = ours(sd1_folder)
    scheduler = make_scheduler("euler_a", pipe.scheduler_config)
    scheduler.set_timesteps(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator(0))
    context = pipe.encode_prompt(["a cat"], ["blurry"], 7.5)
    noise = scheduler.draw_noise(generator(1), latents.shape, latents.dtype, "cpu")
    with torch.inference_mode():
        as_float = pipe.denoise_step(scheduler, latents, 1, context, 7.5, noise[1])
        as_tensor = pipe.denoise_step(scheduler, latents, 1, context, torch.tensor(7.5), noise[1])
    torch.testing.assert_close(as_tensor, as_float, rtol=0, atol=0)
    assert not torch.equal(as_float, latents)


# ---------------------------------------------------------------- img2img parity
@pytest.mark.parametrize("scheduler, strength", [(None, 0.75), ("euler_a", 0.6), ("dpmpp_2m_karras", 1.0)])
def test_img2img_matches_diffusers(sd1_folder, scheduler, strength):
    init = random_picture(64, 48, seed=5)
    mine = ours(sd1_folder).img2img(
        init,
        "an oil painting",
        strength=strength,
        steps=4,
        seed=21,
        negative_prompt="photo",
        scheduler=scheduler,
        num_images=2,
        progress=False,
    )
    theirs = reference(StableDiffusionImg2ImgPipeline, sd1_folder, scheduler)(
        "an oil painting",
        image=init,
        strength=strength,
        num_inference_steps=4,
        negative_prompt="photo",
        num_images_per_prompt=2,
        generator=generator(21),
    ).images
    assert_close_images(mine, theirs)
    assert mine[0].size == (64, 48)


def test_img2img_matches_diffusers_sd2(sd2_folder):
    # v-prediction model with its own Euler scheduler: add_noise and the steps in sigma space.
    init = random_picture(64, 64, seed=6)
    mine = ours(sd2_folder).img2img(
        init, "a watercolor", strength=0.5, steps=4, seed=13, guidance=5.0, negative_prompt="photo", progress=False
    )
    theirs = reference(StableDiffusionImg2ImgPipeline, sd2_folder)(
        "a watercolor",
        image=init,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=5.0,
        negative_prompt="photo",
        generator=generator(13),
    ).images
    assert_close_images(mine, theirs)


# ---------------------------------------------------------------- inpainting
@pytest.mark.parametrize("scheduler, strength", [(None, 1.0), ("euler_a", 0.75)])
def test_inpaint_4_channel_matches_diffusers(sd1_folder, scheduler, strength):
    image, mask = random_picture(64, 48, seed=8), box_mask(64, 48)
    mine = ours(sd1_folder).inpaint(
        image, mask, "a window", strength=strength, steps=3, seed=4, scheduler=scheduler, progress=False
    )
    theirs = reference(StableDiffusionInpaintPipeline, sd1_folder, scheduler)(
        "a window",
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=3,
        width=64,
        height=48,
        generator=generator(4),
    ).images
    assert_close_images(mine, theirs)


@pytest.mark.parametrize("scheduler, strength", [(None, 1.0), ("ddim", 0.5)])
def test_inpaint_9_channel_matches_diffusers(inpaint9_folder, scheduler, strength):
    image, mask = random_picture(64, 64, seed=9), box_mask(64, 64)
    mine = ours(inpaint9_folder).inpaint(
        image, mask, "a door", strength=strength, steps=3, seed=5, num_images=2, scheduler=scheduler, progress=False
    )
    theirs = reference(StableDiffusionInpaintPipeline, inpaint9_folder, scheduler)(
        "a door",
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=3,
        width=64,
        height=64,
        num_images_per_prompt=2,
        generator=generator(5),
    ).images
    assert_close_images(mine, theirs)


def test_inpaint_keeps_the_unmasked_region(sd1_folder):
    image, mask = random_picture(64, 64, seed=10), box_mask(64, 64)
    pipe = ours(sd1_folder)
    seen = []
    result = pipe.inpaint(
        image,
        mask,
        "a window",
        steps=3,
        seed=4,
        scheduler="ddim",
        progress=False,
        callback=lambda i, t, latents: seen.append(latents.clone()),
    )[0]
    # Latent blending: after the last step the unmasked latents are exactly the image's (the seed's
    # first draw is the VAE sample of the image), the masked ones are generated.
    with torch.no_grad():
        image_latents = pipe._encode_image(imageio.image_to_tensor(image, 64, 64), generator(4))
    latent_keep = torch.nn.functional.interpolate(imageio.mask_to_tensor(mask, 64, 64), size=(8, 8)) == 0
    latent_keep = latent_keep.expand_as(image_latents)
    assert torch.equal(seen[-1][latent_keep], image_latents[latent_keep])
    assert not torch.allclose(seen[-1][~latent_keep], image_latents[~latent_keep], atol=0.1)
    keep = np.asarray(mask) == 0
    keep[12:52, 12:52] = False  # stay a few latent pixels away from the mask edge
    ours_kept = np.asarray(result)[keep].astype(float)
    image_kept = np.asarray(image)[keep].astype(float)
    repainted = np.asarray(mask) > 0
    # The known region only goes through a VAE round trip; the masked one is generated afresh.
    kept_error = np.abs(ours_kept - image_kept).mean()
    repaint_error = np.abs(
        np.asarray(result)[repainted].astype(float) - np.asarray(image)[repainted].astype(float)
    ).mean()
    assert kept_error < repaint_error


# ---------------------------------------------------------------- seeds, callback, progress, metadata
def test_random_seed_is_reported_and_reproduces(sd1_folder):
    pipe = ours(sd1_folder)
    first = pipe.generate("a boat", steps=2, scheduler="euler_a", progress=False)[0]
    seed = int(first.info["seed"])
    again = pipe.generate("a boat", steps=2, scheduler="euler_a", seed=seed, progress=False)[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert first.info["prompt"] == "a boat"
    assert first.info["scheduler"] == "euler_a"
    assert first.info["parameters"].startswith("a boat\n")


def test_default_scheduler_name_comes_from_the_checkpoint(sd1_folder):
    image = ours(sd1_folder).generate("a boat", steps=2, seed=1, progress=False)[0]
    assert image.info["scheduler"] == "pndm"


def test_callback_sees_every_step_and_can_cancel(sd1_folder):
    pipe = ours(sd1_folder)
    seen = []
    pipe.generate(
        "a boat",
        steps=3,
        seed=1,
        scheduler="ddim",
        progress=False,
        callback=lambda i, t, latents: seen.append((i, int(t), tuple(latents.shape))),
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert seen[0][2] == (1, 4, 8, 8)
    with pytest.raises(GenerationCancelled, match="cancelled by the callback after step 1") as info:
        pipe.generate("a boat", steps=3, seed=1, scheduler="ddim", progress=False, callback=lambda i, t, latents: i < 1)
    assert info.value.step_index == 1
    assert torch.isfinite(info.value.latents).all()


def test_progress_bar_can_be_turned_off(sd1_folder, capsys):
    pipe = ours(sd1_folder)
    pipe.generate("a boat", steps=2, seed=1, scheduler="ddim", progress=True)
    assert "denoising" in capsys.readouterr().err
    pipe.generate("a boat", steps=2, seed=1, scheduler="ddim", progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- NaN guard
def test_nan_decode_is_redone_in_fp32(sd1_folder, monkeypatch):
    pipe = ours(sd1_folder)
    latents = torch.randn(1, 4, 8, 8, generator=generator(0))
    expected = pipe.decode_latents(latents)
    real_decode = pipe.vae.decode

    def overflowing_decode(z):  # what an fp16 VAE does on some latents
        out = real_decode(z)
        return out if z.dtype == torch.float32 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(pipe.vae, "decode", overflowing_decode)
    pipe.vae.to(torch.bfloat16)
    try:
        with pytest.warns(UserWarning, match="decoded NaN in torch.bfloat16; decoding again in fp32"):
            images = pipe.decode_latents(latents.bfloat16())
        assert next(pipe.vae.parameters()).dtype == torch.bfloat16  # put back afterwards
    finally:
        pipe.vae.to(torch.float32)
    torch.testing.assert_close(images.float(), expected, atol=0.02, rtol=0)


def test_nan_decode_in_fp32_raises(sd1_folder, monkeypatch):
    pipe = ours(sd1_folder)
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(FloatingPointError, match="VAE decoded NaN in fp32"):
        pipe.decode_latents(torch.randn(1, 4, 8, 8))


def test_nan_decode_on_a_vae_that_cannot_be_cast_is_a_clear_error(sd1_folder, monkeypatch):
    pipe = ours(sd1_folder)
    pipe.vae.to(torch.bfloat16)
    try:
        monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((1, 3, 64, 64), float("nan")))

        def refuse(*args, **kwargs):  # what an exported (onnxruntime / tensorrt) VAE does
            raise NotImplementedError("a deployed VAE cannot be cast")

        monkeypatch.setattr(pipe.vae, "to", refuse)
        with pytest.raises(FloatingPointError, match="cannot decode again in fp32: a deployed VAE cannot be cast"):
            pipe.decode_latents(torch.randn(1, 4, 8, 8).bfloat16())
    finally:
        monkeypatch.undo()
        pipe.vae.to(torch.float32)


# ---------------------------------------------------------------- bad input, rejected before denoising
@pytest.fixture
def guarded_pipe(sd1_folder, monkeypatch):
    """Our pipeline, failing the test if any denoising step runs."""
    pipe = ours(sd1_folder)

    def no_step(*args, **kwargs):
        raise AssertionError("a denoising step ran before the bad input was reported")

    monkeypatch.setattr(pipe, "denoise_step", no_step)
    return pipe


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=60), "width must be a positive multiple of 8 .*got 60"),
        (dict(height=36), "height must be a positive multiple of 8 .*got 36"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(guidance=-1.0), "guidance must be a finite number >= 0"),
        (dict(guidance=float("nan")), "guidance must be a finite number >= 0 .*got nan"),
        (dict(scheduler="heun"), "unknown scheduler 'heun'; choose one of ddim, pndm, euler, euler_a"),
        (dict(num_images=0), "num_images must be an integer >= 1, got 0"),
        (dict(seed=-5), "seed must be an integer in"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
    ],
)
def test_generate_bad_input(guarded_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        guarded_pipe.generate("a boat", progress=False, **kwargs)


def test_prompt_type_checked(guarded_pipe):
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list of strings"):
        guarded_pipe.generate([], progress=False)


@pytest.mark.parametrize(
    "strength, message",
    [
        (0.0, r"strength must be in \(0, 1\], got 0.0"),
        (1.5, r"strength must be in \(0, 1\], got 1.5"),
        (True, r"strength must be in \(0, 1\], got True"),
        (0.1, "strength 0.1 with 4 steps leaves no denoising step"),
    ],
)
def test_img2img_bad_strength(guarded_pipe, strength, message):
    with pytest.raises(ValueError, match=message):
        guarded_pipe.img2img(random_picture(64, 64, 0), "x", strength=strength, steps=4, progress=False)


def test_inpaint_mask_size_mismatch(guarded_pipe):
    with pytest.raises(ValueError, match="mask size 32x32 differs from the image size 64x64"):
        guarded_pipe.inpaint(random_picture(64, 64, 0), box_mask(32, 32), "x", progress=False)


def test_missing_init_image(guarded_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="init image file not found: .*nope.png"):
        guarded_pipe.img2img(tmp_path / "nope.png", "x", progress=False)


def test_init_image_not_a_multiple_of_8_is_resized_with_a_warning(sd1_folder):
    with pytest.warns(UserWarning, match="init image size 67x50 is not a multiple of 8; it is resized to 64x48"):
        out = ours(sd1_folder).img2img(
            random_picture(67, 50, 0), "x", steps=2, seed=0, scheduler="ddim", progress=False
        )
    assert out[0].size == (64, 48)


@pytest.fixture
def plain_syntax(sd1_folder):
    """Prompts read as plain text, cut at 77 tokens (the A1111 default encodes long prompts in chunks)."""
    ours(sd1_folder).prompt_syntax = "plain"
    yield
    ours(sd1_folder).prompt_syntax = "a1111"


def test_long_prompt_warns_with_the_dropped_words(sd1_folder, plain_syntax):
    long_prompt = " ".join(["cat"] * 80) + " zebra giraffe"
    with pytest.warns(UserWarning, match=r"prompt 0 is longer .*77 tokens .*dropped: '.*zebra giraffe'"):
        ours(sd1_folder).generate(long_prompt, steps=1, seed=0, scheduler="ddim", progress=False)
    with pytest.warns(UserWarning, match=r"negative prompt 0 is longer .*dropped: '.*zebra giraffe'"):
        ours(sd1_folder).generate(
            "a cat", negative_prompt=long_prompt, steps=1, seed=0, scheduler="ddim", progress=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits gives no warning
        ours(sd1_folder).generate("a cat", steps=1, seed=0, scheduler="ddim", progress=False)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path .*nope does not exist"):
        runtime.load(tmp_path / "nope")


def test_psnr_is_meaningful_for_these_models(sd1_folder):
    # Guards the 35 dB threshold: different seeds must fall far below it.
    pipe = ours(sd1_folder)
    a = pipe.generate("a boat", steps=2, seed=1, scheduler="ddim", progress=False)[0]
    b = pipe.generate("a boat", steps=2, seed=2, scheduler="ddim", progress=False)[0]
    assert psnr(a, b) < 25
    assert not math.isinf(psnr(a, b))
