"""`python -m runtime generate`: short flags, the default outputs/ numbering, --lora PATH[:SCALE], --lora-dir
with <lora:NAME:W> in the prompt, --embeddings-dir; each mistake one line (exit 2) before any weights load."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import runtime
from runtime.__main__ import main, numbered_paths, parse_lora_flag
from runtime.model_hash import lora_hash
from tests.lora_factory import write_kohya_unet_lora
from tests.model_factory import save_diffusers_folder

FAST = ["--steps", "2", "-W", "32", "-H", "32", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("cli_extras") / "tiny-sd1", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def pipe(model):
    return runtime.load(model, backend="torch", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_loras")
    write_kohya_unet_lora(pipe.unet, folder / "ink.safetensors", seed=1)
    return folder


@pytest.fixture(autouse=True)
def shared_pipeline(monkeypatch, pipe, model):
    """Every run of the module gets the one loaded pipeline (its folders set as the loader would)."""
    real_load = runtime.load

    def load(path, lora_dir=None, embeddings_dir=None, **options):
        if str(path) != str(model):
            return real_load(path, lora_dir=lora_dir, embeddings_dir=embeddings_dir, **options)
        pipe.lora_dir, pipe.embeddings_dir = lora_dir, embeddings_dir
        return pipe

    monkeypatch.setattr(runtime, "load", load)


def run(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pixels(path):
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def test_short_flags_are_the_long_ones(model, tmp_path, capsys):
    long_args = ["--model", model, "--prompt", "a fox", "--negative-prompt", "blur", "--out", tmp_path / "l.png"]
    short_args = ["-m", model, "-p", "a fox", "-n", "blur", "-o", tmp_path / "s.png"]
    assert run(capsys, *long_args, "--steps", 2, "--width", 32, "--height", 32, *FAST[6:])[0] == 0
    assert run(capsys, *short_args, *FAST)[0] == 0
    (long_image, long_text), (short_image, short_text) = pixels(tmp_path / "l.png"), pixels(tmp_path / "s.png")
    assert np.array_equal(long_image, short_image) and long_text == short_text
    assert short_text["negative_prompt"] == "blur" and (short_text["width"], short_text["height"]) == ("32", "32")


def test_without_out_images_get_the_next_numbers_in_outputs(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(capsys, "-m", model, "-p", "a fox", *FAST)
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["00001.png"]
    assert "wrote outputs/00001.png" in stdout
    first = (tmp_path / "outputs" / "00001.png").read_bytes()
    (tmp_path / "outputs" / "00007-keep.png").write_bytes(b"someone else's file")
    assert run(capsys, "-m", model, "-p", "a cat", "--num-images", 2, *FAST)[0] == 0
    names = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert names == ["00001.png", "00007-keep.png", "00008.png", "00009.png"]  # after the highest, no gap reused
    assert (tmp_path / "outputs" / "00001.png").read_bytes() == first  # nothing replaced
    assert (tmp_path / "outputs" / "00007-keep.png").read_bytes() == b"someone else's file"
    assert [p.name for p in numbered_paths(tmp_path / "none", 2)] == ["00001.png", "00002.png"]


def test_an_outputs_file_in_the_way_is_a_usage_error(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("not a folder")
    code, _, stderr = run(capsys, "-m", model, "-p", "a fox", *FAST)
    assert code == 2 and stderr == "error: no --out given and ./outputs is not a folder; pass --out FILE.png\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ink.safetensors", ("ink.safetensors", 1.0)),
        ("ink.safetensors:0.5", ("ink.safetensors", 0.5)),
        ("loras/ink.safetensors:-1e-1", ("loras/ink.safetensors", -0.1)),
        (r"C:\loras\ink.safetensors", (r"C:\loras\ink.safetensors", 1.0)),  # a drive colon is not a scale
        (r"C:\loras\ink.safetensors:0.7", (r"C:\loras\ink.safetensors", 0.7)),
    ],
)
def test_lora_flag_parsing(text, expected):
    assert parse_lora_flag(text) == expected


def test_lora_flag_and_prompt_tag_equal_the_api(model, pipe, loras, tmp_path, capsys):
    base_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    flag_args = ["-m", model, "-p", "a fox", "--lora", f"{loras / 'ink.safetensors'}:0.6", "-o", tmp_path / "flag.png"]
    code, _, stderr = run(capsys, *flag_args, *FAST)
    assert code == 0, stderr
    tag_args = ["-m", model, "-p", "a fox <lora:ink:0.6>", "--lora-dir", loras, "-o", tmp_path / "tag.png"]
    code, _, stderr = run(capsys, *tag_args, *FAST)
    assert code == 0, stderr
    assert pipe.loras == {}  # the CLI unloads what it loaded
    for key, value in pipe.unet.state_dict().items():
        assert value.equal(base_weights[key]), key
    pipe.load_lora(loras / "ink.safetensors", scale=0.6)
    try:
        api = np.asarray(pipe.generate("a fox", steps=2, width=32, height=32, seed=7, progress=False)[0])
    finally:
        pipe.unload_lora()
    (flag, flag_text), (tag, tag_text) = pixels(tmp_path / "flag.png"), pixels(tmp_path / "tag.png")
    assert np.array_equal(flag, api) and np.array_equal(tag, api)
    hashes = f"ink: {lora_hash(loras / 'ink.safetensors')}"
    assert flag_text["lora_hashes"] == tag_text["lora_hashes"] == hashes
    assert flag_text["loras"] == tag_text["loras"] == "ink: 0.6"
    assert tag_text["parameters"].startswith("a fox <lora:ink:0.6>\n")  # the tag stays, as in A1111
    assert tag_text["parameters"].endswith(f'Lora hashes: "{hashes}"')


def test_embeddings_dir_reaches_the_prompt(model, tmp_path, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, str(folder / "inky.safetensors"))
    assert run(capsys, "-m", model, "-p", "a fox, inky", "-o", tmp_path / "plain.png", *FAST)[0] == 0
    with_embedding = ["-m", model, "-p", "a fox, inky", "--embeddings-dir", folder, "-o", tmp_path / "emb.png"]
    assert run(capsys, *with_embedding, *FAST)[0] == 0
    assert not np.array_equal(pixels(tmp_path / "plain.png")[0], pixels(tmp_path / "emb.png")[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora", "{tmp}/missing.safetensors"], "--lora file not found: .*missing.safetensors"),
        (["--lora", "{loras}/ink.safetensors:nan"], "--lora .*: the scale 'nan' is not a finite number"),
        (["--lora", ":0.5"], "--lora :0.5: no path before the scale"),
        (["--lora-dir", "{tmp}/nowhere"], "--lora-dir is not a folder: .*nowhere"),
        (["--embeddings-dir", "{tmp}/nowhere"], "--embeddings-dir is not a folder: .*nowhere"),
        (["-p", "a <lora:ink>"], "the prompt names the LoRA 'ink' .* no LoRA folder is set: pass --lora-dir"),
        (["-p", "a <lora:nope:0.5>", "--lora-dir", "{loras}"], r"no LoRA named 'nope' in .* \(it holds: ink\)"),
        (["-p", "a <lora:../ink>", "--lora-dir", "{loras}"], "not by a path"),
        (["-p", "a <lora:ink:lots>", "--lora-dir", "{loras}"], "<lora:ink:lots>: the weight 'lots' is not a finite"),
    ],
)
def test_lora_and_embedding_mistakes_fail_before_loading(model, loras, tmp_path, capsys, monkeypatch, args, message):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(runtime, "load", no_load)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{loras}", str(loras)) for a in args]
    if "-p" not in args:
        args = ["-p", "a fox", *args]
    code, _, stderr = run(capsys, "-m", model, "-o", tmp_path / "o.png", *args)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr), stderr


def test_help_shows_the_new_flags():
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "generate", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    for flag in ("-m MODEL, --model MODEL", "-o OUT, --out OUT", "-W WIDTH, --width WIDTH", "--lora PATH[:SCALE]"):
        assert flag in result.stdout
