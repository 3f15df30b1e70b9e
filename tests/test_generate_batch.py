"""Pipeline.generate_batch: several GenerationRequests through one denoising loop, each request's images
equal to what it gets alone (generate / img2img / inpaint), with its own metadata; one bad or mismatched
request refused before any network runs; under (fake) CUDA graphs a batch replays bit for bit as eager.

Tolerance: a batch runs the UNet and VAE on more rows than a solo run, so fp32 matmuls may round
differently; images must agree within 1/255 per pixel (one uint8 level). A batch of one is bit-identical.
"""

import numpy as np
import PIL.Image
import pytest
import torch

import runtime
from runtime.bench.presets import write_random_model
from runtime.pipeline import GenerationCancelled, GenerationRequest, Pipeline
from tests.fake_cuda_graphs import FakeCudaGraphs

SIZE = dict(width=32, height=48)
MAX_LEVELS = 1  # uint8 levels a batched image may differ from its solo run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model")
    return runtime.load(folder, backend="torch", device="cpu", dtype="fp32")


def _requests(**shared):
    """Three requests that differ in everything a batch lets differ (prompt, negative, seed, guidance,
    image count) and share the rest."""
    common = dict(steps=4, scheduler="euler_a", **SIZE, **shared)
    return [
        GenerationRequest("a red fox", negative_prompt="blurry", seed=11, guidance=7.5, **common),
        GenerationRequest(["an owl", "a cat"], seed=12, guidance=3.0, num_images=2, **common),
        GenerationRequest("a boat at night", negative_prompt="", seed=13, guidance=5.5, **common),
    ]


def _solo(pipe, request):
    kwargs = dict(
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        guidance=request.guidance,
        width=request.width,
        height=request.height,
        seed=request.seed,
        num_images=request.num_images,
        scheduler=request.scheduler,
        progress=False,
        **request.micro,
    )
    if request.mode == "txt2img":
        return pipe.generate(request.prompt, **kwargs)
    if request.mode == "img2img":
        return pipe.img2img(request.image, request.prompt, strength=request.strength, **kwargs)
    return pipe.inpaint(request.image, request.mask, request.prompt, strength=request.strength, **kwargs)


def _assert_matches_solo(pipe, requests, results):
    assert len(results) == len(requests)
    for index, (request, images) in enumerate(zip(requests, results)):
        alone = _solo(pipe, request)
        assert len(images) == len(alone), f"request {index}"
        for mine, theirs in zip(images, alone):
            diff = np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(theirs, dtype=np.int16)).max()
            assert diff <= MAX_LEVELS, f"request {index}: a pixel differs by {diff} levels from its solo run"
            assert mine.info == theirs.info, f"request {index}: metadata differs from its solo run"


def test_txt2img_batch_equals_each_request_alone(tiny):
    requests = _requests()
    results = tiny.generate_batch(requests)
    assert [len(images) for images in results] == [1, 4, 1]
    _assert_matches_solo(tiny, requests, results)
    assert [image.info["seed"] for image in results[1]] == ["12"] * 4
    assert results[2][0].info["guidance"] == "5.5"


def _picture(seed, size=(32, 48)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask(left: bool, size=(32, 48)):
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, : size[0] // 2] = 255 if left else 0
    mask[:, size[0] // 2 :] = 0 if left else 255
    return PIL.Image.fromarray(mask)


@pytest.mark.parametrize("mode, strength", [("img2img", 0.6), ("inpaint", 0.8)])
def test_img2img_and_inpaint_batches_equal_each_request_alone(tiny, mode, strength):
    """Each request its own image (and mask): per-request VAE draws, add_noise and 4-channel blend."""
    extra = [dict(image=_picture(seed)) for seed in (1, 2)]
    if mode == "inpaint":
        extra = [dict(item, mask=_mask(left)) for item, left in zip(extra, (True, False))]
    requests = [
        GenerationRequest("a fox", steps=5, seed=21, strength=strength, scheduler="dpmpp_2m", **extra[0]),
        GenerationRequest(
            "an owl", steps=5, seed=22, strength=strength, scheduler="dpmpp_2m", guidance=4.0, **extra[1]
        ),
    ]
    results = tiny.generate_batch(requests)
    _assert_matches_solo(tiny, requests, results)
    assert results[0][0].info["mode"] == mode


def test_a_batch_of_one_is_bit_identical_to_generate(tiny):
    request = _requests()[1]
    (batched,) = tiny.generate_batch([request])
    for mine, theirs in zip(batched, _solo(tiny, request)):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(steps=5), "steps"),
        (dict(width=48), "width"),
        (dict(scheduler="ddim"), "scheduler"),
        (dict(guidance=1.0), "guided"),
        (dict(image=PIL.Image.new("RGB", (32, 48))), "mode"),
    ],
)
def test_requests_that_cannot_share_a_loop_are_refused_naming_the_field(tiny, monkeypatch, change, field):
    monkeypatch.setattr(tiny, "denoise_step", _no_step)
    first, second, _ = _requests()
    fields = {**vars(second), **second.micro}
    fields.pop("micro")
    other = GenerationRequest(**{**fields, **change})
    assert first.batch_key(tiny) != other.batch_key(tiny)
    with pytest.raises(ValueError, match=f"request 1 cannot share a denoising loop with request 0: {field} "):
        tiny.generate_batch([first, other])


def _no_step(*args, **kwargs):
    raise AssertionError("a denoising step ran before the bad request was reported")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(steps=0), "request 2: steps must be an integer >= 1, got 0"),
        (dict(seed=-1), "request 2: seed must be an integer in"),
        (dict(guidance=float("nan")), "request 2: guidance must be a finite number"),
        (dict(strength=0.5), "request 2: strength is for img2img and inpainting"),
        (dict(refiner=object()), "request 2: refiner: a GenerationRequest has no refiner"),
        (dict(colour="red"), "request 2: unexpected keyword argument"),
    ],
)
def test_a_bad_request_is_named_by_index_before_any_step(tiny, monkeypatch, bad, message):
    monkeypatch.setattr(tiny, "denoise_step", _no_step)
    requests = _requests()
    requests[2] = GenerationRequest("x", **{**SIZE, **bad})
    with pytest.raises((ValueError, TypeError), match=message):
        tiny.generate_batch(requests)


def test_a_callback_returning_false_cancels_the_whole_batch(tiny):
    seen = []

    def stop_after_one(step, timestep, latents):
        seen.append(tuple(latents.shape))
        return step < 1

    with pytest.raises(GenerationCancelled, match="after step 1") as info:
        tiny.generate_batch(_requests(), callback=stop_after_one)
    assert seen == [(6, 4, 6, 4)] * 2
    assert info.value.latents.shape == (6, 4, 6, 4)


def test_batch_under_fake_cuda_graphs_equals_eager(tiny):
    """Per-row guidance is a [B] buffer in the graph entry; capture and replay give eager's bits."""
    graphed = Pipeline(tiny.components, cuda_graphs=True, graph_api=FakeCudaGraphs())
    finals = {}
    for name, pipe in (("graphed", graphed), ("eager", tiny)):
        seen = []
        decode = pipe.decode_latents
        pipe.decode_latents = lambda x, seen=seen, decode=decode: (seen.append(x.clone()), decode(x))[1]
        try:
            for _ in range(2 if name == "graphed" else 1):  # capture, then replay
                pipe.generate_batch(_requests())
        finally:
            del pipe.decode_latents
        finals[name] = seen
    (key,) = graphed.graphs.keys()
    assert key.guidance_shape == (6,) and key.latent_shape[0] == 6
    for run in finals["graphed"]:
        assert torch.equal(run, finals["eager"][0])


def test_sdxl_batch_equals_each_request_alone(tmp_path_factory):
    """SDXL rows: text_embeds and time_ids per request (micro-conditioning may differ), zeros for a
    request without a negative prompt (force_zeros_for_empty_prompt) beside one with a negative."""
    from tests.sdxl_factory import save_sdxl_folder

    base = runtime.load(save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "base", "sdxl", seed=0))
    common = dict(steps=3, scheduler="euler_a", width=32, height=32)
    requests = [
        GenerationRequest("a fox", seed=31, guidance=6.0, original_size=(64, 64), **common),
        GenerationRequest(
            "an owl", negative_prompt="blurry", seed=32, num_images=2, crops_coords_top_left=(4, 8), **common
        ),
    ]
    assert requests[0].batch_key(base) == requests[1].batch_key(base)
    _assert_matches_solo(base, requests, base.generate_batch(requests))
