"""runtime/images.py: conversions match diffusers' VaeImageProcessor, PNG metadata, atomic writes, PSNR."""

import math
import os

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from runtime import images


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("size", [(64, 48), (61, 50)])  # exact size, and one that needs a resize
def test_image_to_tensor_matches_diffusers(size):
    image = random_image(*size)
    ours = images.image_to_tensor(image, 64, 48)
    reference = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=48, width=64)
    assert ours.shape == (1, 3, 48, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_image_to_tensor_drops_alpha():
    image = random_image(16, 16, "RGBA")
    ours = images.image_to_tensor(image, 16, 16)
    expected = images.image_to_tensor(image.convert("RGB"), 16, 16)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_mask_to_tensor_matches_diffusers(mode):
    mask = random_image(40, 24, mode, seed=1)
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    reference = processor.preprocess(mask, height=16, width=32)
    ours = images.mask_to_tensor(mask, 32, 16)
    assert ours.shape == (1, 1, 16, 32)
    assert set(ours.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_to_pil_matches_diffusers_postprocess():
    decoded = torch.randn(2, 3, 8, 12) * 0.8  # VAE-like output, partly outside [-1, 1]
    ours = images.to_pil(images.denormalize(decoded))
    reference = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="pil")
    assert [np.asarray(a).tolist() for a in ours] == [np.asarray(b).tolist() for b in reference]


def test_psnr_values():
    a = np.random.default_rng(2).random((8, 8, 3))
    assert images.psnr(a, a) == math.inf
    b = a + 0.01
    assert images.psnr(a, b) == pytest.approx(40.0)
    ua = (a * 255).astype(np.uint8)
    ub = ua.copy()
    ub[0, 0, 0] ^= 1  # one code value off in 192 samples
    assert images.psnr(PIL.Image.fromarray(ua), ub) == pytest.approx(10 * math.log10(255**2 * 192))
    assert images.psnr(torch.from_numpy(a), b) == pytest.approx(40.0)


def test_psnr_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        images.psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="uint8 image and a float image"):
        images.psnr(np.zeros((4, 4), np.uint8), np.random.rand(4, 4))


def make_info(**overrides):
    fields = dict(
        prompt="a red fox",
        negative_prompt="blurry",
        seed=1234,
        steps=3,
        guidance=7.5,
        scheduler="euler_a",
        width=64,
        height=48,
        model="tiny-sd",
    )
    fields.update(overrides)
    return images.GenerationInfo(**fields)


def test_parameters_text_is_a1111_style():
    text = make_info().parameters_text()
    assert text == (
        "a red fox\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 64x48, Model: tiny-sd"
    )
    no_negative = make_info(negative_prompt="", model=None, strength=0.5, mode="img2img").parameters_text()
    assert "Negative prompt" not in no_negative
    assert no_negative.endswith("Denoising strength: 0.5")


def test_save_png_round_trips_metadata(tmp_path):
    image = random_image(16, 8)
    path = images.save_png(image, tmp_path / "out.png", make_info().as_text_chunks())
    with PIL.Image.open(path) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(image))
        text = reread.text
    assert text["prompt"] == "a red fox"
    assert text["negative_prompt"] == "blurry"
    assert text["seed"] == "1234"
    assert text["scheduler"] == "euler_a"
    assert text["width"] == "64" and text["height"] == "48"
    assert text["parameters"].startswith("a red fox\n")
    assert "strength" not in text  # unset optional fields are left out
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left behind


def test_atomic_output_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with images.atomic_output(target) as temp_path:
            temp_path.write_bytes(b"half a PNG")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_pngs_is_all_or_nothing(tmp_path):
    class Unsavable:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    with pytest.raises(OSError, match="disk full"):
        images.save_pngs([random_image(8, 8), Unsavable()], paths, [{}, {}])
    assert list(tmp_path.iterdir()) == []


def test_save_png_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        images.save_png(random_image(8, 8), tmp_path / "nope" / "out.png")


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="init image file not found: .*missing.png"):
        images.load_image(tmp_path / "missing.png", "init image")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match="junk.png is not a readable image"):
        images.load_image(junk)
    with pytest.raises(TypeError, match="PIL.Image or a file path"):
        images.load_image(42)
    image = random_image(8, 8)
    image.save(tmp_path / "ok.png")
    assert np.array_equal(np.asarray(images.load_image(tmp_path / "ok.png")), np.asarray(image))


def test_atomic_output_gives_the_file_the_usual_permissions(tmp_path):
    target = tmp_path / "out.png"
    with images.atomic_output(target) as temp_path:
        temp_path.write_bytes(b"png")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_generated_image_save_writes_its_metadata(tmp_path):
    """PIL writes no `info` on save; the pipeline's images do (the README's `images[0].save("fox.png")`)."""
    chunks = make_info().as_text_chunks()
    plain = random_image(16, 8)
    plain.info.update(chunks)
    plain.save(tmp_path / "plain.png")
    with PIL.Image.open(tmp_path / "plain.png") as reread:
        assert "parameters" not in reread.text  # why GeneratedImage exists
    generated = images.GeneratedImage.of(plain)
    generated.save(tmp_path / "fox.png")
    generated.save(tmp_path / "named", format="png")
    for name in ("fox.png", "named"):
        with PIL.Image.open(tmp_path / name) as reread:
            assert reread.text == chunks
            assert np.array_equal(np.asarray(reread), np.asarray(plain))
    generated.save(tmp_path / "fox.jpg")  # other formats save as PIL does
    explicit = PIL.PngImagePlugin.PngInfo()
    explicit.add_text("only", "this")
    generated.save(tmp_path / "explicit.png", pnginfo=explicit)
    with PIL.Image.open(tmp_path / "explicit.png") as reread:
        assert reread.text == {"only": "this"}


def test_parameters_text_carries_the_model_hash():
    text = make_info(model_hash="0123456789").parameters_text()
    assert text.endswith("Size: 64x48, Model hash: 0123456789, Model: tiny-sd")


def test_model_hash_of_a_file_is_a1111s(tmp_path):
    import hashlib

    from runtime.model_hash import model_hash

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    assert model_hash(checkpoint) == hashlib.sha256(b"weights" * 1000).hexdigest()[:10]
    assert model_hash(tmp_path / "missing") is None


def test_model_hash_of_a_folder_covers_its_weight_files(tmp_path):
    from runtime.model_hash import model_hash

    for folder in ("unet", "vae", "text_encoder"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").write_bytes(folder.encode() * 10)
        (tmp_path / folder / "config.json").write_text("{}")
    before = model_hash(tmp_path)
    (tmp_path / "unet" / "config.json").write_text('{"changed": 1}')  # not a weight file
    assert model_hash(tmp_path) == before
    (tmp_path / "vae" / "model.safetensors").write_bytes(b"other")
    assert model_hash(tmp_path) != before
