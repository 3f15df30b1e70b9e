"""SDXL images with a LoRA on the UNet and both text encoders equal diffusers' load_lora_weights + set_adapters
(peft and kohya names, fp32 CPU, the tiny SDXL of tests/sdxl_factory.py), and unloading gives the base image."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import runtime
from runtime.images import psnr
from tests.sdxl_factory import build_sdxl_reference_models, save_sdxl_folder
from tests.test_lora import MIN_PSNR_DB, TEXT_TARGETS, peft_lora, to_kohya

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1"]
PROMPT = "a red fox in snow"
RUN = dict(steps=2, guidance=5.0, width=32, height=32)
SEED = 6
SCALE = 0.7


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("xl_lora") / "base", kind="sdxl", seed=0)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    models = build_sdxl_reference_models("sdxl", seed=0)
    parts = {
        "unet": peft_lora(models["unet"], UNET_TARGETS, seed=1),
        "text_encoder": peft_lora(models["text_encoder"], TEXT_TARGETS, seed=2, magnitude=0.4),
        "text_encoder_2": peft_lora(models["text_encoder_2"], TEXT_TARGETS, seed=3, magnitude=0.4),
    }
    folder = tmp_path_factory.mktemp("xl_loras")
    peft = {f"{component}.{key}": value for component, tensors in parts.items() for key, value in tensors.items()}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya = {}
    for component, tensors in parts.items():
        kohya.update(to_kohya(tensors, prefixes[component], alpha=2.0))
    files = {"peft": folder / "peft.safetensors", "kohya": folder / "kohya.safetensors"}
    save_file(peft, str(files["peft"]))
    save_file(kohya, str(files["kohya"]))
    return files


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(folder):
    return runtime.load(folder, backend="torch", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def base_image(pipe):
    return pipe.generate(PROMPT, seed=SEED, progress=False, **RUN)[0]


def diffusers_image(reference, path):
    reference.load_lora_weights(str(path), adapter_name="a")
    try:
        reference.set_adapters(["a"], adapter_weights=[SCALE])
        return reference(
            PROMPT,
            num_inference_steps=RUN["steps"],
            guidance_scale=RUN["guidance"],
            width=RUN["width"],
            height=RUN["height"],
            generator=torch.Generator().manual_seed(SEED),
        ).images[0]
    finally:
        reference.delete_adapters("a")


@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_sdxl_lora_image_matches_diffusers(pipe, reference, base_image, lora_files, style):
    pipe.load_lora(lora_files[style], scale=SCALE)
    try:
        mine = pipe.generate(PROMPT, seed=SEED, progress=False, **RUN)[0]
    finally:
        pipe.unload_lora()
    theirs = diffusers_image(reference, lora_files[style])
    value = psnr(mine, theirs)
    print(f"SDXL {style} LoRA vs diffusers: {value:.1f} dB; vs the base image {psnr(mine, base_image):.1f} dB")
    assert value >= MIN_PSNR_DB
    assert psnr(mine, base_image) < 30  # the LoRA changes the image


def test_unloading_gives_the_sdxl_base_image_bit_for_bit(pipe, base_image, lora_files):
    pipe.load_lora(lora_files["kohya"], scale=SCALE)
    pipe.unload_lora()
    again = pipe.generate(PROMPT, seed=SEED, progress=False, **RUN)[0]
    assert np.array_equal(np.asarray(again), np.asarray(base_image))
