"""Requests refused before any network runs (sizes, counts, seeds, callbacks, prompt text), re-entry
from a callback, and non-finite values named where they first appear."""

import threading

import pytest
import torch

import runtime
from runtime import validation
from tests.model_factory import save_diffusers_folder


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return runtime.load(save_diffusers_folder(tmp_path_factory.mktemp("validation") / "sd1", "sd1"))


@pytest.fixture
def unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def _generate(pipe, **options):
    return pipe.generate("a cat", **{"steps": 2, "progress": False, "scheduler": "ddim", **options})


def test_callback_that_calls_generate_gets_an_error_not_a_deadlock(pipe):
    outcome = {}

    def callback(step, timestep, latents):
        try:
            _generate(pipe)
        except RuntimeError as error:
            outcome["inner"] = str(error)
            raise

    def run():
        try:
            _generate(pipe, callback=callback)
        except RuntimeError as error:
            outcome["outer"] = str(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "generate() from a callback deadlocked"
    assert "from inside its own run" in outcome["inner"] and outcome["outer"] == outcome["inner"]
    assert len(_generate(pipe)) == 1  # the pipeline is free again


def test_other_threads_still_wait_their_turn(pipe):
    results, errors = [], []

    def run(seed):
        try:
            results.append((seed, _generate(pipe, seed=seed)[0]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(callback=42), TypeError, "callback must be callable"),
        (dict(num_images=10**6), ValueError, r"1000000 images in one batch; at most 64 per call"),
        (dict(seed=2**32), ValueError, r"seed must be an integer in \[0, 2\*\*32\).*low 32 bits"),
        (dict(seed=2**64 - 1), ValueError, r"seed must be an integer in \[0, 2\*\*32\)"),
        (
            dict(width=4096, height=4096),
            ValueError,
            r"4096x4096 is 16,777,216 pixels per image, above the limit "
            r"of 4,194,304 .*estimated [\d,.]+ GiB",
        ),
        (
            dict(negative_prompt="bad \udcff bytes"),
            ValueError,
            r"negative_prompt 0 is not valid Unicode text: "
            r"character 4 is '\\udcff'",
        ),
    ],
)
def test_refused_before_any_unet_step(pipe, unet_calls, options, error, message):
    with pytest.raises(error, match=message):
        _generate(pipe, **options)
    assert unet_calls == []


def test_non_utf8_prompt_is_named(pipe, unet_calls):
    with pytest.raises(ValueError, match=r"prompt 1 is not valid Unicode text: character 2 is '\\ud800'"):
        pipe.generate(["fine", "a \ud800 cat"], steps=2, progress=False)
    assert unet_calls == []


def test_max_pixels_can_be_raised_or_lowered(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "max_pixels", 64 * 64 - 1)
    with pytest.raises(ValueError, match="above the limit of 4,095"):
        _generate(pipe)
    monkeypatch.setattr(pipe, "max_pixels", 64 * 64)
    assert _generate(pipe)[0].size == (64, 64)


def test_torch_generator_really_folds_seeds_to_32_bits():
    """Why only [0, 2**32) is accepted: the CPU generator repeats itself beyond it."""
    draw = [torch.randn(4, generator=torch.Generator("cpu").manual_seed(seed)) for seed in (0, 2**32, 1)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_every_accepted_seed_is_recorded_and_distinct(pipe):
    first, last = _generate(pipe, seed=0)[0], _generate(pipe, seed=2**32 - 1)[0]
    assert first.info["seed"] == "0" and last.info["seed"] == str(2**32 - 1)
    assert first.tobytes() != last.tobytes()
    assert 0 <= int(_generate(pipe)[0].info["seed"]) < validation.SEED_LIMIT


def test_overflowing_guidance_is_named_before_the_vae(pipe, monkeypatch):
    decoded = []
    monkeypatch.setattr(pipe.vae, "decode", lambda z: decoded.append(z) or z)
    with pytest.raises(
        FloatingPointError,
        match=r"the denoised latents \(after the UNet and the ddim scheduler, "
        r"before the VAE; guidance 1e\+308\) holds",
    ):
        _generate(pipe, guidance=1e308)
    assert decoded == []


def test_inf_in_vae_weights_is_an_error_not_a_white_image(pipe):
    bias = pipe.vae.decoder.conv_out.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = float("inf")
    try:
        with pytest.raises(
            FloatingPointError, match="VAE decoded inf in fp32 from finite latents: the VAE weights are broken"
        ):
            _generate(pipe)
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_nan_latents_handed_to_the_vae_are_blamed_on_the_latents(pipe):
    with pytest.raises(FloatingPointError, match="the latents it was given already hold NaN or inf"):
        pipe.decode_latents(torch.full((1, 4, 8, 8), float("nan")))
