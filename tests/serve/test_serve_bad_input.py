"""Every bad input the issue names gets a 4xx whose message names the field; never a 500, and the worker
keeps serving afterwards."""

from __future__ import annotations

import base64
import io

import httpx
import PIL.Image
import pytest

from tests.serve.conftest import SIZE

AUTH = {"Authorization": "Bearer test-key"}


def _png_b64(size=(SIZE, SIZE)) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


OPENAI = "/v1/images/generations"
TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
GOOD = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE}

# (route, JSON body, status, the field the message must name)
CASES = [
    (OPENAI, {"prompt": "x", "size": "65x64"}, 400, "size"),
    (OPENAI, {"prompt": "x", "size": "big"}, 400, "size"),
    (OPENAI, {"prompt": "x", "size": "4096x4096"}, 400, "size"),  # past max_pixels
    (OPENAI, {"prompt": "x", "steps": 0}, 400, "steps"),
    (OPENAI, {"prompt": "x", "steps": 10_000}, 400, "steps"),
    (OPENAI, {"prompt": "x", "n": 9}, 400, "n"),
    (OPENAI, {"prompt": "x", "scheduler": "warp drive"}, 400, "scheduler"),
    (OPENAI, {"prompt": "x", "seed": 2**32}, 400, "seed"),
    (OPENAI, {"prompt": "x", "guidance": "lots"}, 400, "guidance"),
    (OPENAI, {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    (OPENAI, {"size": "64x64"}, 400, "prompt"),
    (OPENAI, {"prompt": "x", "model": "/etc/passwd"}, 400, "model"),  # models by configured name only
    (TXT2IMG, {**GOOD, "width": 65}, 400, "width"),
    (TXT2IMG, {**GOOD, "steps": 0}, 400, "steps"),
    (TXT2IMG, {**GOOD, "sampler_name": "Euler z"}, 400, "sampler_name"),
    (TXT2IMG, {**GOOD, "sampler_name": "Euler a", "scheduler": "Karras"}, 400, "scheduler"),
    (TXT2IMG, {**GOOD, "batch_size": 4, "n_iter": 3}, 400, "n_iter"),
    (TXT2IMG, {**GOOD, "batch_size": 100}, 400, "batch_size"),
    (TXT2IMG, {**GOOD, "cfg_scale": None, "seed": "abc"}, 400, "seed"),
    (TXT2IMG, {**GOOD, "enable_hr": True}, 400, "enable_hr"),
    (
        TXT2IMG,
        {**GOOD, "override_settings": {"sd_model_checkpoint": "../other.safetensors"}},
        400,
        "override_settings.sd_model_checkpoint",
    ),
    (IMG2IMG, {**GOOD, "init_images": ["bm90IGFuIGltYWdl"]}, 400, "init_images"),  # base64 of "not an image"
    (IMG2IMG, {**GOOD, "init_images": ["%%%"]}, 400, "init_images"),
    (IMG2IMG, {**GOOD, "init_images": []}, 400, "init_images"),
    (IMG2IMG, {**GOOD, "init_images": [_png_b64()], "mask": _png_b64((32, 32))}, 400, "mask"),
    (IMG2IMG, {**GOOD, "init_images": [_png_b64()], "denoising_strength": 0}, 400, "denoising_strength"),
    (IMG2IMG, {**GOOD, "init_images": [_png_b64()], "steps": 4, "denoising_strength": 0.2}, 400, "denoising_strength"),
]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as client:
        yield client


def _message(response) -> str:
    body = response.json()
    return body["error"]["message"] if isinstance(body.get("error"), dict) else body["detail"]


@pytest.mark.parametrize("route, body, status, field", CASES, ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_bad_field_is_named(client, route, body, status, field):
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    assert _message(response).startswith(f"{field}:"), response.text


@pytest.mark.parametrize("route", [OPENAI, TXT2IMG])
def test_malformed_json(client, route):
    response = client.post(route, content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "body: is not valid JSON" in _message(response)
    response = client.post(route, json=["not", "an", "object"])
    assert response.status_code == 400 and "body: must be a JSON object" in _message(response)


def test_upload_not_an_image(client):
    files = {"image": ("a.png", b"plain text, not a PNG", "image/png")}
    response = client.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert response.status_code == 400 and _message(response).startswith("image: is not a readable image")


def test_upload_too_large(tiny_pipe):
    from tests.serve.conftest import running_server

    with running_server({"tiny": tiny_pipe}, max_upload_bytes=1000) as (url, _):
        big = io.BytesIO()
        PIL.Image.effect_noise((SIZE, SIZE), 64).convert("RGB").save(big, format="PNG")  # noise: no compression
        assert big.tell() > 1000
        response = httpx.post(
            url + "/v1/images/edits", files={"image": ("a.png", big.getvalue())}, data={"prompt": "x"}
        )
        assert response.status_code == 413 and _message(response).startswith("image:"), response.text
        body = {**GOOD, "init_images": [base64.b64encode(big.getvalue()).decode()]}
        response = httpx.post(url + IMG2IMG, json=body)
        assert response.status_code == 413 and _message(response).startswith("init_images:"), response.text
        response = httpx.post(url + TXT2IMG, content=b"x" * 5_000_000, headers={"content-type": "application/json"})
        assert response.status_code == 413 and _message(response).startswith("body:")


def test_edit_needs_a_multipart_image(client):
    response = client.post("/v1/images/edits", json={"prompt": "x"})
    assert response.status_code == 400 and _message(response).startswith("body: must be multipart")
    response = client.post(
        "/v1/images/edits", files={"mask": ("m.png", base64.b64decode(_png_b64()))}, data={"prompt": "x"}
    )
    assert response.status_code == 400 and _message(response).startswith("image:")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXk="}])
def test_missing_or_wrong_api_key(server, headers):
    for route in (OPENAI, TXT2IMG, "/sdapi/v1/sd-models", "/metrics"):
        response = httpx.post(server[0] + route, json=GOOD, headers=headers)
        if route in ("/sdapi/v1/sd-models", "/metrics"):
            response = httpx.get(server[0] + route, headers=headers)
        assert response.status_code == 401, (route, response.text)
        assert "API key" in _message(response) and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server[0] + "/health").status_code == 200  # probes need no key


def test_worker_survives_bad_requests(client):
    for route, body, _, _ in CASES[:5]:
        client.post(route, json=body)
    health = client.get("/health").json()
    assert health["models"]["tiny"]["worker_alive"] is True
    response = client.post(TXT2IMG, json={**GOOD, "seed": 1})
    assert response.status_code == 200 and len(response.json()["images"]) == 1
