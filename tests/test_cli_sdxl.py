"""CLI: --refiner / --refiner-start / --vae, end to end on small SDXL folders and as usage errors."""

import PIL.Image
import pytest

import runtime
from runtime.__main__ import EXIT_USAGE, main
from runtime.images import psnr
from tests.sdxl_factory import save_sdxl_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_sdxl")
    return save_sdxl_folder(root / "base", "sdxl", seed=0), save_sdxl_folder(root / "refiner", "sdxl-refiner", seed=1)


def test_refiner_flags_give_the_api_image(folders, tmp_path):
    base, refiner = folders
    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "--model",
            str(base),
            "--refiner",
            str(refiner),
            "--refiner-start",
            "0.7",
            "--vae",
            str(base / "vae"),
            "--prompt",
            "a fox",
            "--steps",
            "4",
            "--guidance",
            "5",
            "--seed",
            "3",
            "--width",
            "32",
            "--height",
            "32",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    expected = runtime.load(base).generate(
        "a fox",
        steps=4,
        guidance=5.0,
        seed=3,
        width=32,
        height=32,
        refiner=runtime.load(refiner, vae=base / "vae"),
        refiner_start=0.7,
        progress=False,
    )  # --vae applies to both: the refiner decodes
    assert psnr(PIL.Image.open(out).convert("RGB"), expected[0]) == float("inf")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--refiner-start", "0.8"], "--refiner-start needs --refiner"),
        (["--refiner", "MISSING"], "--refiner path not found"),
        (["--vae", "MISSING"], "--vae path not found"),
    ],
)
def test_bad_refiner_flags_are_usage_errors(folders, tmp_path, capsys, extra, message):
    code = main(
        [
            "generate",
            "--model",
            str(folders[0]),
            "--prompt",
            "a fox",
            "--out",
            str(tmp_path / "x.png"),
            *[str(tmp_path / "missing") if e == "MISSING" else e for e in extra],
        ]
    )
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err
