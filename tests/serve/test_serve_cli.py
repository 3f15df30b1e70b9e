"""`python -m runtime serve`: its flags, its checks before any loading, and the defaults it serves with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_parsing_imports_neither_torch_nor_fastapi():
    code = (
        "import sys, runtime.__main__ as m; m.build_parser().parse_args(['serve', '--model', 'x']); "
        "print(sorted(name for name in ('torch', 'fastapi', 'uvicorn', 'ray') if name in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_serve(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    flags = (
        "--model",
        "--host",
        "--port",
        "--api-key",
        "--max-queue",
        "--max-batch",
        "--ray",
        "--replicas",
        "--lora-dir",
    )
    for flag in flags:
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--model", "/no/such/model"], "--model path not found: /no/such/model"),
        (["serve", "--model", "{model}", "--port", "0"], "--port must be in [1, 65535]"),
        (["serve", "--model", "{model}", "--backend", "warp"], "unknown backend 'warp'"),
        (["serve", "--model", "{model}", "--max-queue", "0"], "max_queue must be an integer >= 1"),
        (["serve", "--model", "a={model}", "--model", "a={model}"], "--model name 'a' is given twice"),
        (["serve", "--model", "{model}", "--lora-dir", "/no/loras"], "--lora-dir is not a folder: /no/loras"),
        (["serve", "--model", "{model}", "--embeddings-dir", "/no/ti"], "--embeddings-dir is not a folder: /no/ti"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_loading(argv, message, tiny_model_path, capsys, monkeypatch):
    import runtime

    monkeypatch.setattr(runtime, "load", lambda *a, **k: pytest.fail("loaded a model despite a bad argument"))
    argv = [arg.replace("{model}", str(tiny_model_path)) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_serves_on_loopback_with_the_configured_names(tiny_model_path, tiny_pipe, monkeypatch):
    import uvicorn

    import runtime

    loads, served = [], {}
    monkeypatch.setattr(runtime, "load", lambda path, **options: loads.append((str(path), options)) or tiny_pipe)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_: served.update(app=app, host=host, port=port))
    monkeypatch.setenv("SD_RUNTIME_API_KEY", "from-env")
    assert main(["serve", "--model", f"fast={tiny_model_path}", "--model", str(tiny_model_path)]) == 0
    service = served["app"].state.service
    service.close()
    assert (served["host"], served["port"]) == ("127.0.0.1", 7860)
    assert list(service.models) == ["fast", "tiny"]  # NAME=PATH, else the path's stem
    assert loads[0] == (str(tiny_model_path), {"backend": "torch", "device": "cpu", "dtype": "fp32"})
    assert service.settings.api_key == "from-env"


def test_lora_and_embedding_folders_reach_the_loader(tiny_model_path, tiny_pipe, tmp_path, monkeypatch):
    import uvicorn

    import runtime

    loads = []
    monkeypatch.setattr(runtime, "load", lambda path, **options: loads.append(options) or tiny_pipe)
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: app.state.service.close())
    argv = ["serve", "--model", str(tiny_model_path), "--lora-dir", str(tmp_path), "--embeddings-dir", str(tmp_path)]
    assert main(argv) == 0
    assert loads[0]["lora_dir"] == loads[0]["embeddings_dir"] == str(tmp_path)
