"""`<lora:NAME:W>` in served prompts: applied per request (each image equals the same call in-process),
never batched with other LoRAs, listed at /sdapi/v1/loras, and refused with the tag named when unknown;
textual-inversion embeddings used by name and listed at /sdapi/v1/embeddings."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import runtime
from runtime.images import psnr
from tests.lora_factory import write_kohya_unet_lora
from tests.serve.conftest import in_process_twin, running_server, served_pixels

STEPS, SIZE = 2, 32
LORA_EFFECT_DB = 35.0  # a LoRA here moves its image to 20-29 dB of the image without it


@pytest.fixture(scope="module")
def lora_pipe(tiny_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served_loras")
    pipe = runtime.load(tiny_model_path, lora_dir=folder)
    write_kohya_unet_lora(pipe.unet, folder / "ink.safetensors", seed=1, metadata={"ss_output_name": "ink"})
    write_kohya_unet_lora(pipe.unet, folder / "moss.safetensors", seed=2)
    return pipe


def _body(prompt: str, seed: int) -> dict:
    return {
        "prompt": prompt,
        "seed": seed,
        "steps": STEPS,
        "cfg_scale": 7.0,
        "width": SIZE,
        "height": SIZE,
        "sampler_name": "Euler",
    }


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return served_pixels(response.json()["images"][0])


def test_each_request_gets_its_own_loras_and_other_loras_never_share_a_loop(lora_pipe):
    prompts = ["a fox <lora:ink:0.8>", "a fox", "a fox <lora:moss>", "a fox <lora:ink:0.8>", "a fox <lora:ink:-0.5>"]
    bodies = [_body(prompt, seed=10 + i) for i, prompt in enumerate(prompts * 2)]
    with running_server({"tiny": lora_pipe}, max_batch=8, max_wait_ms=200) as (url, app):
        with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: client.post("/sdapi/v1/txt2img", json=body), bodies))
        loops = app.state.service.models["tiny"].batcher.progress.batches_run
    assert lora_pipe.loras == {}  # every prompt LoRA was removed after its loop
    for body, response in zip(bodies, responses):
        served, alone = _image(response), in_process_twin(lora_pipe, body)
        # batched: equal up to fp32 rounding, at most one level of 255 (another request's LoRA: 20-29 dB)
        assert np.abs(served.astype(int) - alone.astype(int)).max() <= 1, body["prompt"]
        if "<lora:" in body["prompt"]:
            assert (
                psnr(alone, in_process_twin(lora_pipe, {**body, "prompt": "a fox"})) < LORA_EFFECT_DB
            )  # the LoRA acted
    assert 4 <= loops < len(bodies)  # four LoRA sets: at least four loops, and some requests shared one
    served_png = PIL.Image.open(io.BytesIO(base64.b64decode(responses[0].json()["images"][0])))
    assert "Lora hashes" in served_png.info["parameters"]


def test_loras_are_listed_by_name_without_the_servers_folder(lora_pipe, tiny_pipe):
    with running_server({"tiny": lora_pipe}) as (url, _):
        listed = httpx.get(url + "/sdapi/v1/loras").json()
        assert httpx.post(url + "/sdapi/v1/refresh-loras").status_code == 200
    assert [entry["name"] for entry in listed] == ["ink", "moss"]
    assert listed[0] == {
        "name": "ink",
        "alias": "ink",
        "path": "ink.safetensors",
        "metadata": {"ss_output_name": "ink"},
    }
    with running_server({"tiny": tiny_pipe}) as (url, _):
        assert httpx.get(url + "/sdapi/v1/loras").json() == []


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a fox <lora:ghost:0.5>", "<lora:ghost:0.5>: unknown LoRA 'ghost'; this server has: ink, moss"),
        ("a fox <lora:../ink>", "<lora:../ink>: unknown LoRA '../ink'; this server has: ink, moss"),
        ("a fox <lora:ink:lots>", "<lora:ink:lots>"),
    ],
)
def test_a_tag_the_server_cannot_apply_is_a_400_naming_it(lora_pipe, prompt, message):
    with running_server({"tiny": lora_pipe}) as (url, app):
        response = httpx.post(url + "/sdapi/v1/txt2img", json=_body(prompt, seed=1))
        openai = httpx.post(url + "/v1/images/generations", json={"prompt": prompt, "size": "32x32"})
        loops = app.state.service.models["tiny"].batcher.progress.batches_run
    for answer in (response, openai):
        assert answer.status_code == 400 and message in answer.text
        assert str(lora_pipe.lora_dir) not in answer.text  # the server's folder stays on the server
    assert loops == 0  # refused before it was queued


def test_a_tag_on_a_server_without_loras_says_how_to_start_one(tiny_pipe):
    with running_server({"tiny": tiny_pipe}) as (url, _):
        response = httpx.post(url + "/sdapi/v1/txt2img", json=_body("a fox <lora:ink>", seed=1))
    assert response.status_code == 400 and "started without --lora-dir" in response.text


@pytest.fixture(scope="module")
def embedding_pipe(tiny_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served_embeddings")
    pipe = runtime.load(tiny_model_path, embeddings_dir=folder)
    width = pipe.components.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, width, generator=generator)}, str(folder / "inkstyle.safetensors"))
    save_file({"emb_params": torch.randn(1, width + 8, generator=generator)}, str(folder / "otherfamily.safetensors"))
    return pipe


def test_embeddings_are_listed_and_used_by_name(embedding_pipe):
    body = _body("a fox, inkstyle", seed=4)
    with running_server({"tiny": embedding_pipe}) as (url, _):
        listed = httpx.get(url + "/sdapi/v1/embeddings").json()
        served = _image(httpx.post(url + "/sdapi/v1/txt2img", json=body))
    width = embedding_pipe.components.text_encoder.config.hidden_size
    assert listed["loaded"] == {
        "inkstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": 2}
    }
    assert list(listed["skipped"]) == ["otherfamily"]  # vectors of another width: this model cannot use it
    assert np.array_equal(served, in_process_twin(embedding_pipe, body))  # alone in its loop: bit for bit
    # the embedding stood in for its name (the tiny model's text weighs little: the image moves, a little)
    assert not np.array_equal(served, in_process_twin(embedding_pipe, {**body, "prompt": "a fox, ink style"}))
