"""The real `openai` and `webuiapi` clients against a real server: each image equals the same call made
in-process, pixel for pixel, and carries the same PNG metadata as the CLI writes."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import PIL.Image
import pytest
import webuiapi

from tests.serve.conftest import SIZE, STEPS

KEY = "test-key"


def _png(b64: str) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _same(served: PIL.Image.Image, local: PIL.Image.Image) -> None:
    np.testing.assert_array_equal(np.asarray(served.convert("RGB")), np.asarray(local))
    expected = {key: value for key, value in local.info.items() if isinstance(value, str)}
    assert served.text == expected  # the CLI's PNG text chunks: "parameters" and one per field


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def a1111(server):
    port = int(server[0].rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    api.session.headers["Authorization"] = f"Bearer {KEY}"
    return api


def test_openai_generate_equals_in_process(openai_client, tiny_pipe):
    extra = {"seed": 11, "steps": STEPS, "guidance": 5.0, "negative_prompt": "blurry", "scheduler": "euler"}
    result = openai_client.images.generate(prompt="a red fox", size=f"{SIZE}x{SIZE}", n=2, extra_body=extra)
    local = tiny_pipe.generate(
        "a red fox",
        negative_prompt="blurry",
        steps=STEPS,
        guidance=5.0,
        seed=11,
        num_images=2,
        scheduler="euler",
        width=SIZE,
        height=SIZE,
        progress=False,
    )
    assert len(result.data) == 2
    for item, image in zip(result.data, local):
        _same(_png(item.b64_json), image)
    assert _png(result.data[1].b64_json).text["batch_index"] == "1"


def test_openai_edit_without_mask_is_img2img(openai_client, tiny_pipe, init_image):
    result = openai_client.images.edit(
        image=("init.png", _png_bytes(init_image), "image/png"),
        prompt="a watercolour",
        extra_body={"seed": 5, "steps": STEPS, "strength": 0.5},
    )
    local = tiny_pipe.img2img(init_image, "a watercolour", strength=0.5, steps=STEPS, seed=5, progress=False)
    _same(_png(result.data[0].b64_json), local[0])
    assert _png(result.data[0].b64_json).text["mode"] == "img2img"


def test_openai_edit_with_mask_inpaints_the_transparent_part(openai_client, tiny_pipe, init_image):
    """OpenAI's rule: the mask's transparent pixels are repainted; here the left half."""
    mask = PIL.Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, SIZE // 2, SIZE))
    result = openai_client.images.edit(
        image=("init.png", _png_bytes(init_image), "image/png"),
        mask=("mask.png", _png_bytes(mask), "image/png"),
        prompt="a door",
        extra_body={"seed": 6, "steps": STEPS},
    )
    white_left = PIL.Image.new("L", (SIZE, SIZE), 0)
    white_left.paste(255, (0, 0, SIZE // 2, SIZE))  # ours and A1111's rule: white = repaint
    local = tiny_pipe.inpaint(init_image, white_left, "a door", steps=STEPS, seed=6, progress=False)
    _same(_png(result.data[0].b64_json), local[0])
    assert _png(result.data[0].b64_json).text["mode"] == "inpaint"


def test_webuiapi_txt2img_equals_in_process(a1111, tiny_pipe):
    result = a1111.txt2img(
        prompt="a castle",
        negative_prompt="fog",
        seed=21,
        steps=STEPS,
        cfg_scale=6.0,
        width=SIZE,
        height=SIZE,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        batch_size=2,
        n_iter=2,
    )
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [21, 21, 22, 22]  # one seed per iteration (module docstring)
    assert result.info["sampler_name"] == "DPM++ 2M Karras"
    for iteration in range(2):
        local = tiny_pipe.generate(
            "a castle",
            negative_prompt="fog",
            steps=STEPS,
            guidance=6.0,
            seed=21 + iteration,
            num_images=2,
            scheduler="dpmpp_2m_karras",
            width=SIZE,
            height=SIZE,
            progress=False,
        )
        for served, image in zip(result.images[2 * iteration : 2 * iteration + 2], local):
            _same(served, image)
    assert result.info["infotexts"][0] == result.images[0].text["parameters"]
    assert "Sampler: DPM++ 2M Karras" in result.info["infotexts"][0]


def test_webuiapi_random_seed_is_reported(a1111, tiny_pipe):
    result = a1111.txt2img(prompt="a tree", seed=-1, steps=STEPS, width=SIZE, height=SIZE, sampler_name="Euler a")
    seed = result.info["seed"]
    assert 0 <= seed < 2**32 and result.images[0].text["seed"] == str(seed)
    local = tiny_pipe.generate(
        "a tree", steps=STEPS, guidance=7.0, seed=seed, scheduler="euler_a", width=SIZE, height=SIZE, progress=False
    )
    _same(result.images[0], local[0])


def test_webuiapi_img2img_and_inpaint(a1111, tiny_pipe, init_image):
    result = a1111.img2img(
        images=[init_image],
        prompt="a sketch",
        seed=8,
        steps=STEPS,
        cfg_scale=7.5,
        denoising_strength=0.5,
        width=SIZE,
        height=SIZE,
        sampler_name="DDIM",
    )
    local = tiny_pipe.img2img(
        init_image, "a sketch", strength=0.5, steps=STEPS, seed=8, scheduler="ddim", guidance=7.5, progress=False
    )
    _same(result.images[0], local[0])
    mask = PIL.Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4))
    result = a1111.img2img(
        images=[init_image],
        mask_image=mask,
        prompt="a window",
        seed=9,
        steps=STEPS,
        denoising_strength=1.0,
        width=SIZE,
        height=SIZE,
        sampler_name="Euler",
    )
    local = tiny_pipe.inpaint(
        init_image,
        mask,
        "a window",
        strength=1.0,
        steps=STEPS,
        seed=9,
        scheduler="euler",
        guidance=7.0,
        progress=False,
    )
    _same(result.images[0], local[0])
    assert result.info["is_using_inpainting_conditioning"] is True


def test_a1111_listings(a1111, server):
    names = [sampler["name"] for sampler in a1111.get_samplers()]
    assert names == ["DDIM", "PLMS", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM"]
    (model,) = a1111.get_sd_models()
    assert model["model_name"] == "tiny" and model["title"] == f"tiny [{model['hash']}]"
    assert server[0] not in str(model) and "/" not in model["filename"]  # no server path leaks
    assert a1111.get_options()["sd_model_checkpoint"] == model["title"]
    progress = a1111.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0.0
    assert a1111.interrupt() is None  # nothing running: a no-op


def test_metrics_count_what_happened(server, openai_client):
    import httpx

    openai_client.images.generate(prompt="a boat", size=f"{SIZE}x{SIZE}", extra_body={"steps": 2, "seed": 1})
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "sd_queue_depth",
        "sd_images_total",
        "sd_step_seconds_bucket",
        "sd_request_seconds_bucket",
        "sd_denoise_loops_total",
        'sd_requests_total{route="/v1/images/generations",status="200"}',
    ):
        assert name in text, name
