"""`python -m runtime generate`: PNGs with metadata, numbering, atomic output, one-line errors (exit 2)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import runtime
from runtime.__main__ import main, output_paths
from runtime.pipeline import Pipeline
from tests.model_factory import save_diffusers_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("cli") / "tiny-sd1", kind="sd1", seed=0)


@pytest.fixture(autouse=True)
def load_once(monkeypatch):
    """The CLI calls runtime.load each run; load each (path, options) once for the whole module."""
    real_load = runtime.load

    def cached_load(path, **options):
        key = (str(path), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in _pipelines:
            _pipelines[key] = real_load(path, **options)
        return _pipelines[key]

    monkeypatch.setattr(runtime, "load", cached_load)


_pipelines = {}


def picture(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC).save(path)
    return path


def mask_file(path, width, height):
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    PIL.Image.fromarray(mask, mode="L").save(path)
    return path


def run_cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_text(path):
    with PIL.Image.open(path) as image:
        return image.size, dict(image.text)


def test_output_paths_naming(tmp_path):
    assert [p.name for p in output_paths(tmp_path / "out.png", 3)] == ["out.png", "out-1.png", "out-2.png"]


def test_txt2img_writes_pngs_with_metadata(model, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code, stdout, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "a red fox",
        "--negative-prompt",
        "blurry",
        "--out",
        out,
        "--steps",
        2,
        "--guidance",
        6.5,
        "--seed",
        42,
        "--width",
        64,
        "--height",
        48,
        "--scheduler",
        "euler_a",
        "--num-images",
        2,
        "--no-progress",
    )
    assert code == 0, stderr
    assert stderr == ""  # --no-progress: no bar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox.png"]  # and no temp files
    assert "wrote" in stdout and "seed 42" in stdout
    size, text = png_text(out)
    assert size == (64, 48)
    assert text["prompt"] == "a red fox"
    assert text["negative_prompt"] == "blurry"
    assert text["seed"] == "42"
    assert text["steps"] == "2"
    assert text["guidance"] == "6.5"
    assert text["scheduler"] == "euler_a"
    assert (text["width"], text["height"]) == ("64", "48")
    assert text["model"] == "tiny-sd1"
    assert text["mode"] == "txt2img"
    assert text["parameters"] == (
        "a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 6.5, "
        f"Seed: 42, Size: 64x48, Model hash: {text['model_hash']}, Model: tiny-sd1"
    )
    assert re.fullmatch("[0-9a-f]{10}", text["model_hash"])
    assert (text["backend"], text["dtype"]) == ("torch", "fp32")
    assert png_text(tmp_path / "fox-1.png")[1]["batch_index"] == "1"


def test_same_seed_same_image_as_the_api(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "a boat",
        "--out",
        out,
        "--steps",
        2,
        "--seed",
        3,
        "--scheduler",
        "ddim",
        "--no-progress",
    )
    assert code == 0, stderr
    expected = runtime.load(model, backend="torch", device="cpu", dtype="fp32").generate(
        "a boat", steps=2, seed=3, scheduler="ddim", progress=False
    )[0]
    with PIL.Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(expected))


def test_random_seed_is_recorded(model, tmp_path, capsys):
    out = tmp_path / "r.png"
    code, stdout, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "a boat",
        "--out",
        out,
        "--steps",
        1,
        "--scheduler",
        "ddim",
        "--no-progress",
    )
    assert code == 0, stderr
    seed = png_text(out)[1]["seed"]
    assert seed.isdigit() and f"seed {seed}" in stdout


def test_progress_bar_shown_by_default(model, tmp_path, capsys):
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "a boat",
        "--out",
        tmp_path / "p.png",
        "--steps",
        1,
        "--seed",
        0,
        "--scheduler",
        "ddim",
    )
    assert code == 0
    assert "denoising" in stderr


def test_img2img_and_inpaint(model, tmp_path, capsys):
    init = picture(tmp_path / "init.png", 64, 48)
    mask = mask_file(tmp_path / "mask.png", 64, 48)
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "oil",
        "--init-image",
        init,
        "--strength",
        0.5,
        "--out",
        tmp_path / "i2i.png",
        "--steps",
        4,
        "--seed",
        1,
        "--no-progress",
    )
    assert code == 0, stderr
    size, text = png_text(tmp_path / "i2i.png")
    assert size == (64, 48) and text["mode"] == "img2img" and text["strength"] == "0.5"
    assert "Denoising strength: 0.5" in text["parameters"]
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "a window",
        "--init-image",
        init,
        "--mask",
        mask,
        "--out",
        tmp_path / "inp.png",
        "--steps",
        2,
        "--seed",
        1,
        "--no-progress",
    )
    assert code == 0, stderr
    size, text = png_text(tmp_path / "inp.png")
    assert size == (64, 48) and text["mode"] == "inpaint" and text["strength"] == "1.0"


def test_failed_run_leaves_existing_output_untouched(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "keep.png"
    out.write_bytes(b"the previous image")

    def failing_step(self, *args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(Pipeline, "denoise_step", failing_step)
    code, _, stderr = run_cli(
        capsys, "--model", model, "--prompt", "x", "--out", out, "--steps", 2, "--num-images", 2, "--no-progress"
    )
    assert code == 2
    assert stderr == "error: CUDA error: out of memory\n"
    assert out.read_bytes() == b"the previous image"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_successful_run_overwrites_existing_output(model, tmp_path, capsys):
    out = tmp_path / "again.png"
    out.write_bytes(b"old")
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "x",
        "--out",
        out,
        "--steps",
        1,
        "--seed",
        0,
        "--scheduler",
        "ddim",
        "--no-progress",
    )
    assert code == 0, stderr
    assert png_text(out)[1]["prompt"] == "x"


def test_long_prompt_warning_is_one_line(model, tmp_path, capsys):
    prompt = " ".join(["cat"] * 80) + " zebra"
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        prompt,
        "--out",
        tmp_path / "w.png",
        "--steps",
        1,
        "--seed",
        0,
        "--scheduler",
        "ddim",
        "--no-progress",
        "--prompt-syntax",
        "plain",
    )
    assert code == 0
    assert stderr.startswith("warning: prompt 0 is longer than the text encoder's 77 tokens")
    assert "zebra" in stderr and stderr.count("\n") == 1


def test_long_prompt_is_kept_whole_by_default(model, tmp_path, capsys):
    """A1111 syntax (the default): a long prompt is encoded in 77-token chunks, so nothing is dropped."""
    prompt = " ".join(["cat"] * 80) + " (zebra:1.4)"
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        prompt,
        "--out",
        tmp_path / "w.png",
        "--steps",
        1,
        "--seed",
        0,
        "--scheduler",
        "ddim",
        "--no-progress",
    )
    assert code == 0, stderr
    assert stderr == ""
    assert png_text(tmp_path / "w.png")[1]["prompt"] == prompt


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheduler", "heun"], "unknown scheduler 'heun'; choose one of ddim, pndm"),
        (["--width", "60"], r"width must be a positive multiple of 8 \(the VAE factor\), got 60"),
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["--num-images", "0"], "num_images must be an integer >= 1, got 0"),
        (["--guidance", "-2"], "guidance must be a finite number >= 0"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--mask", "{tmp}/mask.png"], "--mask needs --init-image"),
        (["--init-image", "{tmp}/missing.png"], "--init-image file not found: .*missing.png"),
        (["--init-image", "{tmp}/init.png", "--strength", "1.5"], r"strength must be in \(0, 1\], got 1.5"),
        (
            ["--init-image", "{tmp}/init.png", "--mask", "{tmp}/small_mask.png"],
            "mask size 32x32 differs from the image size 64x64",
        ),
        (["--dtype", "fp12"], "fp12"),
        (["--backend", "cuda-magic"], "unknown backend 'cuda-magic'"),
    ],
)
def test_bad_input_one_line_exit_2(model, tmp_path, capsys, args, message):
    picture(tmp_path / "init.png", 64, 64)
    mask_file(tmp_path / "mask.png", 64, 64)
    mask_file(tmp_path / "small_mask.png", 32, 32)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "out.png"
    code, _, stderr = run_cli(
        capsys, "--model", model, "--prompt", "x", "--out", out, "--steps", "2", "--no-progress", *args
    )
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr), stderr
    assert not out.exists()


def test_bad_paths(model, tmp_path, capsys):
    cases = [
        (["--model", tmp_path / "no-model", "--out", tmp_path / "o.png"], "--model path not found: .*no-model"),
        (["--model", model, "--out", tmp_path / "o.jpg"], "--out must be a .png file"),
        (["--model", model, "--out", tmp_path / "nodir" / "o.png"], "--out folder does not exist"),
    ]
    for args, message in cases:
        code, _, stderr = run_cli(capsys, "--prompt", "x", *args)
        assert code == 2
        assert re.search(message, stderr), stderr
        assert stderr.count("\n") == 1


def test_missing_required_argument(capsys):
    assert main(["generate", "--prompt", "x", "--out", "o.png"]) == 2
    # argparse names both spellings of the flag since -m exists (stable-diffusion.cpp's short flags).
    assert capsys.readouterr().err == "error: the following arguments are required: -m/--model\n"


def test_module_entry_point_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            "generate",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --model path not found")


# ----------------------------------------------------------------------------- reaching every feature


def test_bare_command_prints_usage(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m runtime") and "generate" in out and "make-model" in out


def test_help_lists_choices_from_the_tables_without_importing_torch():
    code = (
        "import sys, contextlib, io\n"
        "from runtime.__main__ import build_parser\n"
        "parser = build_parser()\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    parser.parse_args(['generate', '--help'])\n"
        "print('torch' in sys.modules)\n"
        "print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported_torch, help_text = result.stdout.split("\n", 1)
    assert imported_torch == "False"
    from runtime.backends import BACKENDS
    from runtime.dtypes import PRECISIONS
    from runtime.schedulers import SCHEDULER_NAMES

    flat = " ".join(help_text.split())
    for names in (BACKENDS, SCHEDULER_NAMES, PRECISIONS):
        assert ", ".join(names) in flat
    assert "(default: torch)" in flat and "(default: fp32)" in flat and "(default: 30)" in flat


def test_choices_read_without_import_equal_the_tables():
    from runtime import cli_choices
    from runtime.backends import BACKENDS, EXPORTED
    from runtime.dtypes import PRECISIONS
    from runtime.prompt_syntax import PROMPT_SYNTAXES
    from runtime.schedulers import SCHEDULER_NAMES

    assert cli_choices.backends() == tuple(BACKENDS)
    assert cli_choices.exported_backends() == EXPORTED
    assert cli_choices.schedulers() == SCHEDULER_NAMES
    assert cli_choices.dtypes() == tuple(PRECISIONS)
    assert cli_choices.prompt_syntaxes() == PROMPT_SYNTAXES


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheduler", "heun"], "unknown scheduler 'heun'; choose one of ddim, pndm"),
        (["--backend", "cuda-magic"], "unknown backend 'cuda-magic'; choose one of torch, triton"),
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["--seed", "-2"], r"--seed must be -1 \(random\) or an integer in \[0, 2\*\*32\), got -2"),
        (["--guidance", "-1"], "guidance must be a finite number >= 0"),
        (["--dtype", "fp12"], "unknown dtype 'fp12'; valid names: fp32"),
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
        (["--backend", "onnxruntime"], "--backend onnxruntime runs exported graphs: pass --engine-dir DIR"),
        (["--engine-dir", "{tmp}"], "--engine-dir is for the onnxruntime, tensorrt backends, not --backend torch"),
        (["--backend", "tensorrt", "--engine-dir", "{tmp}"], "--backend tensorrt runs on CUDA: pass --device cuda"),
        (
            ["--backend", "triton"],
            "--backend triton on --device cpu needs the Triton interpreter: set TRITON_INTERPRET=1",
        ),
    ],
)
def test_values_are_checked_before_any_weights_load(model, tmp_path, capsys, monkeypatch, args, message):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(runtime, "load", no_load)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, stderr = run_cli(capsys, "--model", model, "--prompt", "x", "--out", tmp_path / "o.png", *args)
    assert code == 2
    assert re.search(message, stderr) and stderr.count("\n") == 1, stderr


def test_seed_minus_one_is_random_and_recorded(model, tmp_path, capsys):
    seeds = []
    for name in ("a.png", "b.png"):
        code, stdout, stderr = run_cli(
            capsys,
            "--model",
            model,
            "--prompt",
            "a boat",
            "--out",
            tmp_path / name,
            "--steps",
            1,
            "--seed",
            -1,
            "--scheduler",
            "ddim",
            "--no-progress",
            "--width",
            32,
            "--height",
            32,
        )
        assert code == 0, stderr
        seed = png_text(tmp_path / name)[1]["seed"]
        assert seed.isdigit() and f"seed {seed}" in stdout
        seeds.append(seed)
    assert seeds[0] != seeds[1]  # 2**32 choices: equal by chance once in four billion runs
    assert png_text(tmp_path / "a.png")[0] == (32, 32)


def test_load_options_reach_the_loader(model, tmp_path, capsys, monkeypatch):
    seen = {}

    def recording_load(path, **options):
        seen.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runtime, "load", recording_load)
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "x",
        "--out",
        tmp_path / "o.png",
        "--variant",
        "fp16",
        "--allow-pickle",
        "--backend",
        "onnxruntime",
        "--engine-dir",
        tmp_path / "engines",
    )
    assert code == 2 and stderr == "error: stop here\n"
    assert seen == {
        "backend": "onnxruntime",
        "device": "cpu",
        "dtype": "fp32",
        "variant": "fp16",
        "allow_pickle": True,
        "vae": None,
        "engine_dir": str(tmp_path / "engines"),
    }


def test_pickle_checkpoint_needs_allow_pickle(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from tests.model_factory import save_single_file

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(save_single_file(tmp_path / "model.safetensors", kind="sd1")))}, checkpoint)
    args = [
        "--model",
        checkpoint,
        "--prompt",
        "x",
        "--steps",
        1,
        "--seed",
        0,
        "--scheduler",
        "ddim",
        "--no-progress",
        "--width",
        32,
        "--height",
        32,
    ]
    code, _, stderr = run_cli(capsys, *args, "--out", tmp_path / "refused.png")
    assert code == 2 and "is a pickle file" in stderr
    code, _, stderr = run_cli(capsys, *args, "--out", tmp_path / "read.png", "--allow-pickle")
    assert code == 0, stderr
    assert (tmp_path / "read.png").is_file() and not (tmp_path / "refused.png").exists()


def test_onnxruntime_backend_from_the_cli(model, tmp_path, capsys):
    engines = tmp_path / "engines"
    args = [
        "--model",
        model,
        "--prompt",
        "a boat",
        "--steps",
        2,
        "--seed",
        5,
        "--scheduler",
        "ddim",
        "--no-progress",
        "--width",
        32,
        "--height",
        32,
    ]
    code, _, stderr = run_cli(
        capsys, *args, "--out", tmp_path / "ort.png", "--backend", "onnxruntime", "--engine-dir", engines
    )
    assert code == 0, stderr
    assert (engines / "unet.onnx").is_file()
    code, _, stderr = run_cli(capsys, *args, "--out", tmp_path / "torch.png")
    assert code == 0, stderr
    with PIL.Image.open(tmp_path / "ort.png") as ort, PIL.Image.open(tmp_path / "torch.png") as eager:
        assert imageio_psnr(ort, eager) >= 35


def imageio_psnr(a, b):
    from runtime.images import psnr

    return psnr(np.asarray(a), np.asarray(b))


def test_make_model_writes_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-model", "--preset", "tiny", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp folder left
    code, _, stderr = run_cli(
        capsys,
        "--model",
        out,
        "--prompt",
        "a fox",
        "--out",
        tmp_path / "fox.png",
        "--steps",
        1,
        "--seed",
        0,
        "--no-progress",
    )
    assert code == 0, stderr
    assert main(["make-model", str(out)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err


def test_make_model_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    import importlib

    from runtime.__main__ import _PRESETS_MODULE

    presets = importlib.import_module(_PRESETS_MODULE)

    def failing_write(preset, folder, seed=0):
        (Path(folder) / "unet").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(presets, "write_random_model", failing_write)
    assert main(["make-model", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == "error: disk full\n"
    assert list(tmp_path.iterdir()) == []
    assert main(["make-model", "--preset", "sd99", str(tmp_path / "m")]) == 2
    assert "unknown preset 'sd99'; choose one of tiny, sd15" in capsys.readouterr().err


def test_readme_save_writes_the_text_chunk(model, tmp_path):
    pipe = runtime.load(model, backend="torch", device="cpu", dtype="fp32")
    images = pipe.generate(
        "a watercolor fox",
        negative_prompt="blurry",
        steps=1,
        seed=1,
        scheduler="ddim",
        width=32,
        height=32,
        progress=False,
    )
    images[0].save(tmp_path / "fox.png")  # as the README writes it
    text = png_text(tmp_path / "fox.png")[1]
    assert text["parameters"].startswith("a watercolor fox\nNegative prompt: blurry\nSteps: 1")
    assert (text["backend"], text["dtype"], text["seed"]) == ("torch", "fp32", "1")
    assert re.search(r"Model hash: [0-9a-f]{10}, Model: tiny-sd1", text["parameters"])
