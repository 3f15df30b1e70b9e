"""python -m export: writes graphs and manifest, reuses them, rebuilds on change, refuses bad input."""

import json
import shutil

import pytest

from export.__main__ import main

SHAPES = ["--min", "1x32x32", "--opt", "1x64x64", "--max", "2x128x128"]


def _run(capsys, *args):
    code = main([*args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_export_reuse_and_rebuild(model_folder, tmp_path, capsys, caplog):
    folder = shutil.copytree(model_folder("sd1"), tmp_path / "model")
    out = tmp_path / "out"
    args = [
        "--model",
        str(folder),
        "--out",
        str(out),
        "--format",
        "onnx",
        "--networks",
        "text_encoder",
        "vae_decoder",
        *SHAPES,
    ]
    code, text = _run(capsys, *args)
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "text_encoder.onnx", "vae_decoder.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["artifacts"]["vae_decoder.onnx"]
    assert entry["key_fields"]["dtype"] == "fp32" and len(entry["key_fields"]["weights"]) == 64
    assert entry["key_fields"]["tools"]["torch"] and entry["info"]["spec"]["inputs"][0][0] == "latent"
    assert len(entry["files"]["vae_decoder.onnx"]["sha256"]) == 64

    caplog.clear()
    with caplog.at_level("INFO", logger="export"):
        assert _run(capsys, *args)[0] == 0
    assert "vae_decoder.onnx: reused (up to date)" in caplog.text and "exporting" not in caplog.text

    (folder / "text_encoder" / "config.json").write_text(
        (folder / "text_encoder" / "config.json")
        .read_text()
        .replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 2e-05')
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="export"):
        assert _run(capsys, *args)[0] == 0
    assert "text_encoder.onnx: stale: weights changed" in caplog.text
    assert "vae_decoder.onnx: reused" in caplog.text

    caplog.clear()  # a changed option rebuilds too
    with caplog.at_level("INFO", logger="export"):
        assert _run(capsys, *args, "--dtype", "fp16")[0] == 0
    assert "vae_decoder.onnx: stale: dtype changed" in caplog.text


def test_unrelated_out_dir_is_refused(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF")
    code, text = _run(capsys, "--model", str(model_folder("sd1")), "--out", str(out), *SHAPES)
    assert code == 2 and "thesis.pdf" in text and "refusing" in text
    assert (out / "thesis.pdf").read_bytes() == b"%PDF"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min", "1x32"], "not of the form BxHxW"),
        (["--min", "1x64x64", "--opt", "1x32x32"], "need min <= opt <= max"),
        (["--min", "1x36x32"], "multiples of the VAE factor 8"),
        (["--dtype", "bf16"], "applies to --format tensorrt"),
        (["--format", "tensorrt"], "TensorRT is not installed"),
    ],
)
def test_bad_options_give_one_clear_line(args, message, model_folder, tmp_path, capsys):
    try:
        code, text = _run(capsys, "--model", str(model_folder("sd1")), "--out", str(tmp_path / "o"), *args)
    except SystemExit as exit_:  # argparse rejects malformed values itself
        code, text = exit_.code, capsys.readouterr().err
    assert code == 2 and message in text, text


def test_missing_model_path(tmp_path, capsys):
    code, text = _run(capsys, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert code == 2 and "none does not exist" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "o", "--dtype", "fp12"], "error: argument --dtype: invalid choice: 'fp12'"),
        (["--model", "m"], "error: the following arguments are required: --out"),
    ],
)
def test_argparse_mistakes_are_one_line_without_the_usage_block(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines() == [err.strip()] and err.startswith(message), err
