"""`python -m runtime generate`: every output target checked before the run, --max-pixels, and prompt
bytes that are not UTF-8, each a one-line error (exit 2) with nothing written."""

import os
import subprocess
import sys

import pytest

import runtime
from runtime.__main__ import main
from tests.model_factory import save_diffusers_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("cli-outputs") / "tiny-sd1", kind="sd1", seed=0)


def run_cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI got as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("runtime.load was called: the check did not run before the run")

    monkeypatch.setattr(runtime, "load", refuse)


@pytest.mark.parametrize("blocked", ["out.png", "out-1.png", "out-2.png"])
def test_an_occupied_target_stops_the_run_before_it_starts(model, tmp_path, capsys, no_load, blocked):
    (tmp_path / blocked).mkdir()
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "x",
        "--out",
        tmp_path / "out.png",
        "--num-images",
        3,
        "--steps",
        1,
        "--no-progress",
    )
    assert code == 2 and stderr.count("\n") == 1
    assert f"output {tmp_path / blocked} exists and is not a file" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [blocked]


def test_dangling_symlink_target_is_named(model, tmp_path, capsys, no_load):
    os.symlink(tmp_path / "nowhere", tmp_path / "out-1.png")
    code, _, stderr = run_cli(
        capsys, "--model", model, "--prompt", "x", "--out", tmp_path / "out.png", "--num-images", 2, "--no-progress"
    )
    assert code == 2 and "out-1.png is a dangling symlink" in stderr


def test_save_pngs_checks_every_target_first(tmp_path):
    import PIL.Image

    from runtime import images as imageio

    (tmp_path / "b.png").mkdir()
    picture = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(IsADirectoryError, match="b.png exists and is not a file; nothing was written"):
        imageio.save_pngs([picture] * 3, [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"], [{}] * 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]


def test_max_pixels(model, tmp_path, capsys):
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "x",
        "--out",
        tmp_path / "big.png",
        "--width",
        4096,
        "--height",
        4096,
        "--steps",
        1,
        "--no-progress",
    )
    assert code == 2 and stderr.count("\n") == 1
    assert "4096x4096 is 16,777,216 pixels per image, above the limit of 4,194,304" in stderr
    assert "GiB" in stderr and "--max-pixels" in stderr
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "x",
        "--out",
        tmp_path / "small.png",
        "--width",
        64,
        "--height",
        64,
        "--max-pixels",
        4095,
        "--steps",
        1,
        "--no-progress",
    )
    assert code == 2 and "above the limit of 4,095" in stderr
    code, _, stderr = run_cli(
        capsys,
        "--model",
        model,
        "--prompt",
        "x",
        "--out",
        tmp_path / "small.png",
        "--width",
        64,
        "--height",
        64,
        "--max-pixels",
        4096,
        "--steps",
        1,
        "--no-progress",
    )
    assert code == 0, stderr
    code, _, stderr = run_cli(
        capsys, "--model", model, "--prompt", "x", "--out", tmp_path / "x.png", "--max-pixels", 0, "--no-progress"
    )
    assert code == 2 and "--max-pixels must be a positive integer" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.png"]


def test_prompt_bytes_that_are_not_utf8(model, tmp_path):
    """argv bytes that are not UTF-8 arrive as lone surrogates: one line naming the prompt."""
    out = tmp_path / "o.png"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "LC_ALL": "C.UTF-8"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime",
            "generate",
            "--model",
            str(model),
            "--prompt",
            b"a \xff cat",
            "--out",
            str(out),
            "--steps",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        env=env,
        timeout=300,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "prompt 0 is not valid Unicode text: character 2 is '\\udcff'" in stderr
    assert "Traceback" not in stderr and not out.exists()
