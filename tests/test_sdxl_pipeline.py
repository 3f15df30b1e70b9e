"""SDXL txt2img / img2img / inpaint and the base + refiner ensemble against diffusers' SDXL pipelines,
on small random SDXL-shaped diffusers folders, fp32 CPU: >= 35 dB PSNR for the same seed."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

import runtime
from runtime.images import psnr
from runtime.schedulers import diffusers_equivalent
from tests.model_factory import save_diffusers_folder
from tests.sdxl_factory import save_sdxl_folder
from tests.test_pipeline import box_mask, random_picture

MIN_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "base", "sdxl", seed=0)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "refiner", "sdxl-refiner", seed=1)


@pytest.fixture(scope="module")
def base(base_folder):
    return runtime.load(base_folder)


@pytest.fixture(scope="module")
def refiner(refiner_folder):
    return runtime.load(refiner_folder)


_components = {}


def reference(cls, folder, scheduler=None):
    if folder not in _components:
        loader = StableDiffusionXLPipeline if "base" in str(folder) else StableDiffusionXLImg2ImgPipeline
        _components[folder] = loader.from_pretrained(folder, torch_dtype=torch.float32)
    pipe = cls.from_pipe(_components[folder])
    if scheduler is not None:
        class_name, overrides = diffusers_equivalent(scheduler)
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed):
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a.size == b.size
        value = psnr(a, b)
        assert value >= MIN_PSNR_DB, f"PSNR {value:.1f} dB < {MIN_PSNR_DB} dB"


@pytest.mark.parametrize(
    "scheduler, negative",
    [
        (None, None),  # the folder's Euler; no negative prompt: force_zeros_for_empty_prompt
        ("euler_a", "blurry"),  # ancestral draws, a negative prompt
        ("dpmpp_2m_karras", ""),  # an empty (given) negative prompt is encoded, not zeroed
        ("ddim", None),
    ],
)
def test_txt2img_matches_diffusers(base, base_folder, scheduler, negative):
    mine = base.generate(
        "a red fox in snow",
        negative_prompt=negative,
        steps=5,
        guidance=5.0,
        seed=11,
        width=64,
        height=48,
        num_images=2,
        scheduler=scheduler,
        progress=False,
    )
    theirs = reference(StableDiffusionXLPipeline, base_folder, scheduler)(
        "a red fox in snow",
        negative_prompt=negative,
        num_inference_steps=5,
        guidance_scale=5.0,
        width=64,
        height=48,
        num_images_per_prompt=2,
        generator=generator(11),
    ).images
    assert_close(mine, theirs)


def test_empty_negative_is_not_zeros(base):
    """The zeroing matters: None and "" give different images (so the parity above tests both)."""
    none, empty = (
        base.generate("a fox", negative_prompt=n, steps=3, guidance=5.0, seed=2, width=32, height=32, progress=False)[0]
        for n in (None, "")
    )
    assert psnr(none, empty) < 60


def test_micro_conditioning_matches_diffusers(base, base_folder):
    micro = dict(
        original_size=(512, 384),
        crops_coords_top_left=(16, 8),
        target_size=(64, 64),
        negative_original_size=(128, 128),
        negative_target_size=(96, 64),
    )
    mine = base.generate(
        ["a fox", "a cat"],
        negative_prompt=["dark", "blurry"],
        steps=4,
        guidance=6.0,
        seed=5,
        width=64,
        height=64,
        progress=False,
        **micro,
    )
    theirs = reference(StableDiffusionXLPipeline, base_folder)(
        ["a fox", "a cat"],
        negative_prompt=["dark", "blurry"],
        num_inference_steps=4,
        guidance_scale=6.0,
        width=64,
        height=64,
        generator=generator(5),
        **micro,
    ).images
    assert_close(mine, theirs)
    plain = base.generate(
        "a fox", negative_prompt="dark", steps=4, guidance=6.0, seed=5, width=64, height=64, progress=False
    )
    assert psnr(plain[0], mine[0]) < 60, "the micro-conditioning changed nothing"


def test_unguided_matches_diffusers(base, base_folder):
    mine = base.generate("a fox", steps=3, guidance=1.0, seed=4, width=48, height=32, progress=False)
    theirs = reference(StableDiffusionXLPipeline, base_folder)(
        "a fox", num_inference_steps=3, guidance_scale=1.0, width=48, height=32, generator=generator(4)
    ).images
    assert_close(mine, theirs)


@pytest.mark.parametrize("scheduler", [None, "euler_a"])
def test_img2img_matches_diffusers(base, base_folder, scheduler):
    image = random_picture(64, 48, seed=3)
    mine = base.img2img(
        image, "a fox", strength=0.6, steps=5, guidance=5.0, seed=6, num_images=2, scheduler=scheduler, progress=False
    )
    theirs = reference(StableDiffusionXLImg2ImgPipeline, base_folder, scheduler)(
        "a fox",
        image=image,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        generator=generator(6),
    ).images
    assert_close(mine, theirs)


def test_refiner_img2img_matches_diffusers(refiner, refiner_folder):
    image = random_picture(48, 64, seed=4)
    mine = refiner.img2img(
        image,
        "a fox",
        negative_prompt="dark",
        strength=0.5,
        steps=6,
        guidance=5.0,
        seed=8,
        aesthetic_score=7.0,
        negative_aesthetic_score=2.0,
        progress=False,
    )
    theirs = reference(StableDiffusionXLImg2ImgPipeline, refiner_folder)(
        "a fox",
        negative_prompt="dark",
        image=image,
        strength=0.5,
        num_inference_steps=6,
        guidance_scale=5.0,
        aesthetic_score=7.0,
        negative_aesthetic_score=2.0,
        generator=generator(8),
    ).images
    assert_close(mine, theirs)


@pytest.mark.parametrize("strength, scheduler", [(1.0, None), (0.7, "euler_a")])
def test_inpaint_matches_diffusers(base, base_folder, strength, scheduler):
    image, mask = random_picture(64, 48, seed=5), box_mask(64, 48)
    mine = base.inpaint(
        image,
        mask,
        "a fox",
        strength=strength,
        steps=5,
        guidance=5.0,
        seed=9,
        num_images=2,
        scheduler=scheduler,
        progress=False,
    )
    theirs = reference(StableDiffusionXLInpaintPipeline, base_folder, scheduler)(
        "a fox",
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0,
        num_images_per_prompt=2,
        width=64,
        height=48,
        generator=generator(9),
    ).images
    assert_close(mine, theirs)


@pytest.mark.parametrize("scheduler, start", [(None, 0.8), ("euler_a", 0.6)])
def test_base_and_refiner_ensemble_matches_two_diffusers_calls(
    base, refiner, base_folder, refiner_folder, scheduler, start
):
    mine = base.generate(
        "a fox at dawn",
        negative_prompt="blurry",
        steps=8,
        guidance=5.0,
        seed=12,
        width=64,
        height=48,
        num_images=2,
        scheduler=scheduler,
        refiner=refiner,
        refiner_start=start,
        progress=False,
    )
    rng = generator(12)
    latents = reference(StableDiffusionXLPipeline, base_folder, scheduler)(
        "a fox at dawn",
        negative_prompt="blurry",
        num_inference_steps=8,
        guidance_scale=5.0,
        width=64,
        height=48,
        num_images_per_prompt=2,
        denoising_end=start,
        output_type="latent",
        generator=rng,
    ).images
    # The base's two latents go to the refiner as two rows of one prompt.
    theirs = reference(StableDiffusionXLImg2ImgPipeline, refiner_folder, scheduler)(
        ["a fox at dawn"] * 2,
        negative_prompt=["blurry"] * 2,
        image=latents,
        num_inference_steps=8,
        guidance_scale=5.0,
        denoising_start=start,
        generator=rng,
    ).images
    assert_close(mine, theirs)
    alone = base.generate(
        "a fox at dawn",
        negative_prompt="blurry",
        steps=8,
        guidance=5.0,
        seed=12,
        width=64,
        height=48,
        scheduler=scheduler,
        progress=False,
    )
    assert psnr(alone[0], mine[0]) < 60, "the refiner changed nothing"


def test_force_upcast_decodes_an_fp16_vae_in_fp32(base_folder, monkeypatch):
    pipe = runtime.load(base_folder, dtype="fp16")
    seen = []
    decode = pipe.vae.decode
    monkeypatch.setattr(
        pipe.vae, "decode", lambda z: seen.append((z.dtype, next(pipe.vae.parameters()).dtype)) or decode(z)
    )
    pipe.decode_latents(torch.randn(1, 4, 4, 4, dtype=torch.float16))
    assert seen == [(torch.float32, torch.float32)]
    assert next(pipe.vae.parameters()).dtype == torch.float16  # put back
    object.__setattr__(pipe.vae.config, "force_upcast", False)  # the fp16-fix VAE's config
    seen.clear()
    pipe.decode_latents(torch.randn(1, 4, 4, 4, dtype=torch.float16))
    assert seen == [(torch.float16, torch.float16)]


def test_vae_option_loads_a_separate_vae(base_folder, tmp_path):
    from tests.sdxl_factory import build_sdxl_reference_models

    other = build_sdxl_reference_models("sdxl", seed=5)["vae"]
    other.save_pretrained(tmp_path / "vae")
    pipe = runtime.load(base_folder, vae=tmp_path / "vae")
    for key, value in other.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[key], value), key


# ---------------------------------------------------------------- bad input, refused before any denoising
@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return runtime.load(save_diffusers_folder(tmp_path_factory.mktemp("sd1") / "model", kind="sd1", seed=0))


def _no_unet(pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the UNet ran before the error")

    monkeypatch.setattr(pipe.unet, "forward", fail)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(refiner_start=0.8), ValueError, "without a refiner"),
        (dict(refiner="REFINER", refiner_start=1.0), ValueError, r"refiner_start must be a fraction in \(0, 1\)"),
        (dict(refiner="REFINER", refiner_start=0.0), ValueError, r"refiner_start must be a fraction in \(0, 1\)"),
        (dict(refiner="SD1"), ValueError, "refiner must be an SDXL pipeline"),
        (dict(refiner="REFINER", refiner_start=0.999), ValueError, "leaves the refiner no step"),
        (dict(original_size=(1, 2, 3)), ValueError, "original_size must be a pair"),
        (dict(aesthetic_scor=6.0), TypeError, "aesthetic_scor"),
    ],
)
def test_bad_sdxl_arguments_are_refused_first(base, refiner, sd1, monkeypatch, kwargs, error, message):
    kwargs = {k: {"REFINER": refiner, "SD1": sd1}.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    _no_unet(base, monkeypatch)
    _no_unet(refiner, monkeypatch)
    with pytest.raises(error, match=message):
        base.generate("a fox", steps=4, width=32, height=32, progress=False, **kwargs)


def test_refiner_cannot_generate_from_noise(refiner):
    with pytest.raises(ValueError, match="SDXL refiner"):
        refiner.generate("a fox", steps=2, width=32, height=32)


def test_sd1_base_takes_no_refiner_or_micro_conditioning(sd1, refiner):
    with pytest.raises(ValueError, match="needs an SDXL base"):
        sd1.generate("a fox", steps=2, refiner=refiner)
    with pytest.raises(TypeError, match="only for SDXL"):
        sd1.generate("a fox", steps=2, original_size=(64, 64))


def test_sd1_vae_for_sdxl_is_refused(base_folder, tmp_path):
    from diffusers import AutoencoderKL

    config = dict(AutoencoderKL.load_config(base_folder / "vae"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    AutoencoderKL(**{**config, "scaling_factor": 0.18215}).save_pretrained(tmp_path / "sd1_vae")
    with pytest.raises(ValueError, match="scaling_factor"):
        runtime.load(base_folder, vae=tmp_path / "sd1_vae")


def pixels(images):
    return np.stack([np.asarray(image) for image in images])


def test_sdxl_replays_from_cuda_graphs_as_eager(base_folder, refiner_folder):
    """SDXL's added conditioning (text_embeds, time_ids) lives in the graphs' static buffers: capture and
    replay equal eager bit for bit, for txt2img and for a base + refiner ensemble (graphs that stop at the
    base's end step, and the refiner's that start mid-schedule). Runs on the CPU through the fake graph API."""
    from runtime.pipeline import Pipeline
    from runtime.weights import load_components
    from tests.fake_cuda_graphs import FakeCudaGraphs

    base_components, refiner_components = load_components(base_folder), load_components(refiner_folder)
    graphed = Pipeline(base_components, cuda_graphs=True, graph_api=FakeCudaGraphs())
    graphed_refiner = Pipeline(refiner_components, cuda_graphs=True, graph_api=FakeCudaGraphs())
    eager, eager_refiner = Pipeline(base_components), Pipeline(refiner_components)
    runs = {
        "txt2img": lambda pipe, refiner: pipe.generate(
            "a red fox",
            negative_prompt="blurry",
            steps=3,
            seed=4,
            width=64,
            height=48,
            scheduler="euler_a",
            progress=False,
        ),
        "ensemble": lambda pipe, refiner: pipe.generate(
            "a red fox", steps=5, seed=5, width=64, height=64, refiner=refiner, refiner_start=0.6, progress=False
        ),
    }
    for what, run in runs.items():
        expected = pixels(run(eager, eager_refiner))
        for attempt in ("capture", "replay"):
            np.testing.assert_array_equal(pixels(run(graphed, graphed_refiner)), expected, err_msg=f"{what}, {attempt}")
    assert len(graphed.graphs) == 2 and len(graphed_refiner.graphs) == 1


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_to_moves_every_network_of_an_sdxl_pipeline(which, base_folder, refiner_folder):
    """Both text encoders move with the UNet and VAE (the refiner has only encoder 2)."""
    pipe = runtime.load(base_folder if which == "base" else refiner_folder)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    networks = [getattr(pipe.components, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    assert all(p.dtype == torch.bfloat16 for net in networks if net is not None for p in net.parameters())
    options = dict(steps=2, width=64, height=64, seed=3, progress=False)
    if which == "base":
        image = pipe.generate("a red fox", **options)[0]
    else:
        image = pipe.img2img(random_picture(64, 64, seed=0), "a red fox", strength=0.5, **options)[0]
    assert image.info["dtype"] == "bf16"
