"""pipe(...) with diffusers' keywords against diffusers' own pipelines on the tiny SD1 model (>= 35 dB)."""

import types

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

import runtime
from runtime.diffusers_compat import move_pipeline
from runtime.images import psnr
from tests.model_factory import save_diffusers_folder

MIN_PSNR_DB = 35.0
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("compat") / "model", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    return runtime.load(folder)


@pytest.fixture(scope="module")
def components(folder):
    base = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    return base.components


def diffusers_pipe(cls, components):
    reference = cls(**components)
    reference.set_progress_bar_config(disable=True)
    return reference


def generator(seed):
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a.size == b.size
        assert psnr(a, b) >= MIN_PSNR_DB


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)


def test_txt2img_call_matches_diffusers(pipe, components):
    kwargs = dict(
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=7.5,
        width=64,
        height=48,
        num_images_per_prompt=2,
    )
    mine = pipe(PROMPT, generator=generator(7), progress=False, **kwargs).images
    theirs = diffusers_pipe(StableDiffusionPipeline, components)(PROMPT, generator=generator(7), **kwargs).images
    assert_close(mine, theirs)
    assert mine[0].info["seed"] == "7"  # the generator's seed is recorded


def test_latents_and_output_types_match_diffusers(pipe, components):
    latents = torch.randn((1, 4, 6, 8), generator=generator(3))
    kwargs = dict(num_inference_steps=3, guidance_scale=6.0)
    reference = diffusers_pipe(StableDiffusionPipeline, components)
    for output_type in ("latent", "np", "pt"):
        mine = pipe(PROMPT, latents=latents, output_type=output_type, progress=False, **kwargs).images
        theirs = reference(PROMPT, latents=latents, output_type=output_type, **kwargs).images
        assert type(mine) is type(theirs) and mine.shape == theirs.shape
        mine, theirs = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
        if output_type == "latent":
            assert mine.shape == (1, 4, 6, 8)
            assert np.abs(mine - theirs).max() < 1e-3 * max(1.0, np.abs(theirs).max())
        else:
            assert psnr(np.clip(mine, 0, 1), np.clip(theirs, 0, 1)) >= MIN_PSNR_DB
    image = pipe(PROMPT, latents=latents, progress=False, **kwargs).images[0]
    assert image.size == (64, 48)  # the size follows the latents


def test_prompt_embeds_match_diffusers(pipe, components):
    positive = pipe.encode_prompt(["a lighthouse", "a bowl of ramen"], None, 1.0)
    negative = pipe.encode_prompt(["blurry", "dark"], None, 1.0)
    kwargs = dict(num_inference_steps=2, guidance_scale=7.5, width=32, height=32)
    mine = pipe(
        prompt_embeds=positive, negative_prompt_embeds=negative, generator=generator(1), progress=False, **kwargs
    ).images
    reference = diffusers_pipe(StableDiffusionPipeline, components)
    theirs = reference(prompt_embeds=positive, negative_prompt_embeds=negative, generator=generator(1), **kwargs).images
    assert_close(mine, theirs)
    # prompt_embeds with a text negative prompt: the negative is encoded.
    mine = pipe(
        prompt_embeds=positive[:1], negative_prompt="blurry", generator=generator(2), progress=False, **kwargs
    ).images
    theirs = reference(prompt_embeds=positive[:1], negative_prompt="blurry", generator=generator(2), **kwargs).images
    assert_close(mine, theirs)
    assert mine[0].info["prompt"] == "<prompt_embeds>"


def test_clip_skip_matches_diffusers(pipe, components):
    # The tiny text encoder has 2 layers, so 1 is the deepest skip it allows (A1111's "Clip skip: 2").
    kwargs = dict(negative_prompt="blurry", num_inference_steps=2, guidance_scale=7.5, width=32, height=32)
    mine = pipe(PROMPT, clip_skip=1, generator=generator(4), progress=False, **kwargs).images
    # diffusers 0.42's own clip_skip path reads text_encoder.text_model, which transformers 5 no longer has;
    # its rule, written out on transformers' encoder: the prompt's hidden_states[-(clip_skip + 1)] through
    # the final LayerNorm; the negative prompt's last layer.
    reference = diffusers_pipe(StableDiffusionPipeline, components)

    def ids(text):
        return reference.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    with torch.no_grad():
        hidden = reference.text_encoder(ids(PROMPT), output_hidden_states=True).hidden_states[-2]
        prompt_embeds = reference.text_encoder.final_layer_norm(hidden)
        negative_prompt_embeds = reference.text_encoder(ids("blurry"))[0]
    theirs = reference(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        generator=generator(4),
        **{k: v for k, v in kwargs.items() if k != "negative_prompt"},
    ).images
    assert_close(mine, theirs)
    unskipped = pipe(PROMPT, generator=generator(4), progress=False, **kwargs).images
    assert psnr(mine[0], unskipped[0]) < MIN_PSNR_DB  # the skip changed the image


def test_img2img_and_inpaint_calls_match_diffusers(pipe, components):
    init, mask = picture(64, 48), PIL.Image.new("L", (64, 48))
    mask.paste(255, (16, 12, 48, 36))
    kwargs = dict(num_inference_steps=4, guidance_scale=7.5, negative_prompt="blurry")
    mine = pipe("oil painting", image=init, strength=0.6, generator=generator(5), progress=False, **kwargs).images
    theirs = diffusers_pipe(StableDiffusionImg2ImgPipeline, components)(
        "oil painting", image=init, strength=0.6, generator=generator(5), **kwargs
    ).images
    assert_close(mine, theirs)
    assert mine[0].info["mode"] == "img2img"
    mine = pipe("a window", image=init, mask_image=mask, generator=generator(6), progress=False, **kwargs).images
    theirs = diffusers_pipe(StableDiffusionInpaintPipeline, components)(
        "a window", image=init, mask_image=mask, generator=generator(6), **kwargs
    ).images
    assert_close(mine, theirs)
    assert mine[0].info["mode"] == "inpaint"


def test_return_dict_false_gives_a_tuple(pipe):
    images, nsfw = pipe(PROMPT, num_inference_steps=1, width=32, height=32, return_dict=False, progress=False)
    assert len(images) == 1 and nsfw is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(eta=0.5), TypeError, "eta"),
        (dict(output_type="jpeg"), ValueError, "output_type must be one of pil, np, pt, latent, got 'jpeg'"),
        (
            dict(latents=torch.zeros(1, 4, 5, 5), width=32, height=32),
            ValueError,
            r"latents must be a tensor of shape \(1, 4, 4, 4\)",
        ),
        (dict(strength=0.5), ValueError, "strength= is for img2img and inpainting"),
        (dict(mask_image=PIL.Image.new("L", (32, 32))), ValueError, "mask_image= needs image="),
        (dict(generator=[torch.Generator()]), ValueError, "a list .* is not supported"),
        (dict(prompt_embeds=torch.zeros(1, 77, 64)), ValueError, "exactly one of prompt= and prompt_embeds="),
        (dict(clip_skip=5), ValueError, r"clip_skip must be an integer in \[0, 2\)"),
        (dict(num_inference_steps=0), ValueError, "steps must be an integer >= 1"),
    ],
)
def test_bad_arguments(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(PROMPT, progress=False, **kwargs)


def test_bad_prompt_embeds(pipe):
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(1, 77, 32\); expected \[1, tokens, 64\]"):
        pipe(prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=1, progress=False)


def test_to_moves_dtype_and_back(folder):
    pipe = runtime.load(folder)
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.bfloat16
    image = pipe(PROMPT, num_inference_steps=1, width=32, height=32, progress=False).images[0]
    assert image.info["dtype"] == "bf16"
    pipe.to("cpu", "fp32")
    assert pipe.dtype == torch.float32 and next(pipe.text_encoder.parameters()).dtype == torch.float32


def test_to_refuses_what_the_backend_cannot_do():
    exported = types.SimpleNamespace(
        backend="onnxruntime", device=torch.device("cpu"), dtype=torch.float32, graphs=None
    )
    with pytest.raises(ValueError, match="the onnxruntime backend runs graphs exported for cpu"):
        move_pipeline(exported, torch.float16)
    assert move_pipeline(exported, "cpu", torch.float32) is exported  # no change asked: fine
    graphed = types.SimpleNamespace(backend="torch", device=torch.device("cuda"), dtype=torch.float16, graphs=object())
    with pytest.raises(ValueError, match="replays CUDA graphs; it cannot move to cpu"):
        move_pipeline(graphed, "cpu")
    with pytest.raises(Exception, match="unknown dtype 'fp12'|not a valid torch device"):
        move_pipeline(exported, "fp12")
