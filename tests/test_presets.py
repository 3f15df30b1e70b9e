"""runtime/bench/presets.py: random-weight models written as diffusers folders, loadable by us and diffusers."""

import re

import pytest
import torch
from transformers import CLIPTokenizer as ReferenceTokenizer

import runtime.tokenizer
from runtime.bench.presets import PRESETS, preset_configs, write_random_model
from runtime.weights import load_components

PROMPT = "A red fox, 3 cubs & snow!"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


def test_written_model_loads_with_the_preset_architecture_and_moved_weights(tiny_folder):
    components = load_components(tiny_folder)
    configs = preset_configs("tiny")
    assert components.unet.config.block_out_channels == tuple(configs["unet"]["block_out_channels"])
    norm = components.unet.conv_norm_out
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))  # perturbed off default init


def test_written_tokenizer_is_the_real_clip_vocabulary(tiny_folder):
    ours = load_components(tiny_folder).tokenizer([PROMPT])
    theirs = ReferenceTokenizer.from_pretrained(str(tiny_folder / "tokenizer"))
    expected = theirs([PROMPT], padding="max_length", max_length=77).input_ids
    assert ours.tolist() == expected
    assert ours[0, 0].item() == 49406  # the real vocabulary's BOS


def test_without_open_clip_a_byte_level_vocabulary_is_written(tmp_path, monkeypatch):
    def missing():
        raise FileNotFoundError("open_clip is not installed")

    monkeypatch.setattr(runtime.tokenizer, "_open_clip_bpe_path", missing)
    folder = write_random_model("tiny", tmp_path / "model")
    ours = load_components(folder).tokenizer([PROMPT])
    theirs = ReferenceTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert ours.tolist() == theirs([PROMPT], padding="max_length", max_length=77).input_ids
    # Each non-space character is its own token (its "</w>" form at a word's end), between BOS and EOS.
    characters = len(PROMPT.replace(" ", "").lower())
    assert ours[0, 0].item() == 512
    assert (ours[0, 1 : characters + 1] < 512).all() and ours[0, characters + 1].item() == 513


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=re.escape(f"unknown preset 'sd99'; choose one of {PRESETS}")):
        preset_configs("sd99")


# Every activation of the full-size random networks must stay this far below fp16's largest finite
# value (65504): a factor of 8 of headroom, so that fp16 rows time real numbers, not inf / NaN.
FP16_HEADROOM_BOUND = 65504 / 8


class _PeakActivations:
    """max |output| of every module of a network, read by forward hooks (removed on exit)."""

    def __init__(self, model: torch.nn.Module):
        self.peaks: dict[str, float] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name or type(model).__name__))
            for name, module in model.named_modules()
        ]

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for tensor in outputs:
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    peak = tensor.detach().abs().max().item()
                    self.peaks[name] = max(self.peaks.get(name, 0.0), peak)

        return record

    def assert_within(self, bound: float, what: str) -> None:
        assert self.peaks, f"{what}: no activation was recorded"
        worst = max(self.peaks, key=self.peaks.get)
        assert all(torch.isfinite(torch.tensor(v)) for v in self.peaks.values()), f"{what}: non-finite at {worst}"
        assert self.peaks[worst] < bound, (
            f"{what}: activation {self.peaks[worst]:.4g} at {worst} exceeds {bound:.4g} (fp16 max / 8)"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_random_weights_leave_fp16_headroom(preset):
    """The full-size presets in fp32 at a 16x16 latent (one network in memory at a time): every module's
    output stays under 65504/8 for a prompt's context, pure-noise latents at the first and last timestep,
    and a unit-variance latent decoded. The fp16 VAE decode is checked for finiteness where CUDA is
    available: on the CPU, fp16 and bf16 convolutions take minutes for a 64x64 image (measured), so
    there the fp32 activations against the bound stand for it."""
    import gc

    from runtime.bench.presets import random_network

    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 20:] = 49406, 49407  # BOS, a 19-token prompt, EOS padding
    with torch.no_grad():
        text_encoder = random_network(preset, "text_encoder")
        with _PeakActivations(text_encoder) as peaks:
            context = text_encoder(ids)
        peaks.assert_within(FP16_HEADROOM_BOUND, f"{preset} text encoder")
        del text_encoder
        gc.collect()

        unet = random_network(preset, "unet")
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        with _PeakActivations(unet) as peaks:
            for timestep in (999, 1):
                unet(latents, timestep, context)
        peaks.assert_within(FP16_HEADROOM_BOUND, f"{preset} UNet")
        del unet
        gc.collect()

        vae = random_network(preset, "vae")
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) / vae.config.scaling_factor
        with _PeakActivations(vae) as peaks:
            vae.decode(z)
        peaks.assert_within(FP16_HEADROOM_BOUND, f"{preset} VAE decode")
        if torch.cuda.is_available():
            image = vae.to("cuda", torch.float16).decode(z.to("cuda", torch.float16))
            assert torch.isfinite(image).all(), f"{preset}: the fp16 VAE decode is not finite"


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    return write_random_model("tiny-sdxl", tmp_path_factory.mktemp("tiny-sdxl") / "model")


def test_tiny_sdxl_is_written_with_both_encoders_and_loads_here_and_in_diffusers(tiny_sdxl_folder):
    import diffusers

    assert (tiny_sdxl_folder / "text_encoder_2" / "model.safetensors").is_file()
    components = load_components(tiny_sdxl_folder)
    assert components.kind == "sdxl" and components.pipeline_config["force_zeros_for_empty_prompt"] is True
    assert components.text_encoder_2.config.projection_dim == 128
    ids = components.tokenizer_2([PROMPT])
    assert ids[0, -1].item() == 0  # tokenizer_2 pads with "!" (id 0), tokenizer 1 with EOS
    assert components.tokenizer([PROMPT])[0, -1].item() == 49407
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_folder))
    ours = components.text_encoder_2.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in theirs.text_encoder_2.state_dict().items() if k in ours)
    # Without "!": transformers makes the pad token "!" split prompts; ours keeps OpenCLIP's BPE (runtime/tokenizer.py).
    text = PROMPT.rstrip("!")
    assert (
        theirs.tokenizer_2([text], padding="max_length", max_length=77).input_ids
        == components.tokenizer_2([text]).tolist()
    )


def test_sdxl_bench_presets_bring_their_run_settings():
    from runtime.bench.cli import parse_args
    from runtime.bench.presets import preset_run

    config, _, _ = parse_args(["--preset", "tiny-sdxl", "--device", "cpu", "--backends", "torch"])
    assert (config.width, config.height, config.steps, config.guidance) == (128, 128, 4, 5.0)
    config, _, _ = parse_args(["--preset", "tiny-sdxl", "--device", "cpu", "--steps", "3", "--backends", "torch"])
    assert config.steps == 3 and config.width == 128
    assert preset_run("sdxl") == {"width": 1024, "height": 1024, "steps": 30, "guidance": 5.0}
    assert preset_run("tiny") is None
    with pytest.raises(SystemExit):
        parse_args(["--preset", "sdxl", "--device", "cpu"])


def test_the_sdxl_baseline_row_is_diffusers_sdxl_pipeline_on_the_same_weights(tmp_path):
    """The in-memory master (no weight files) -> StableDiffusionXLPipeline; same image as our torch row."""
    import diffusers

    from runtime.bench.baselines import diffusers_pipeline
    from runtime.bench.measure import BenchConfig
    from runtime.bench.models import build_master, pipeline_for
    from runtime.images import psnr

    config = BenchConfig(preset="tiny-sdxl", device="cpu", dtype="fp32", width=64, height=64, steps=2, step_iters=20)
    master = build_master(config, tmp_path)
    baseline = diffusers_pipeline(master, config)
    assert isinstance(baseline.pipe, diffusers.StableDiffusionXLPipeline)
    run = dict(negative_prompt="blurry", steps=2, guidance=5.0, width=64, height=64, seed=3, num_images=1)
    theirs = baseline.generate(PROMPT, **run)[0]
    ours = pipeline_for("torch", master, "cpu", "fp32").generate(PROMPT, progress=False, **run)[0]
    assert psnr(theirs, ours) >= 35.0
    context = baseline.encode_prompt([PROMPT], ["blurry"], 5.0)
    assert context[0].shape == (1, 77, 64 + 128)  # both encoders' states side by side
