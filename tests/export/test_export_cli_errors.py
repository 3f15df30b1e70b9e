"""python -m export: disk-full and exporter errors are one line (exit 2), an interrupt is one line
(exit 130), also while torch is still being imported."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import export.onnx
from export.__main__ import main


def _run(capsys, *args):
    code = main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    "error, code, message",
    [
        (OSError(28, "No space left on device"), 2, r"^error: \[Errno 28\] No space left on device\n$"),
        (
            RuntimeError("Exporting the operator 'aten::foo'\n to ONNX opset version 17 is not supported"),
            2,
            r"^error: exporting failed: RuntimeError: Exporting the operator 'aten::foo' to ONNX opset version 17 "
            r"is not supported\n$",
        ),
        (KeyboardInterrupt(), 130, r"^error: interrupted; finished artifacts are kept"),
    ],
)
def test_failures_are_one_line(tmp_path, capsys, monkeypatch, error, code, message):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(export.onnx, "ensure_onnx", fail)
    got, stderr = _run(capsys, "--model", tmp_path, "--out", tmp_path / "out")
    assert got == code
    assert "Traceback" not in stderr
    assert re.search(message, stderr), stderr


def test_sigint_during_imports_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        [sys.executable, "-m", "export", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    time.sleep(0.5)  # inside `import torch` (seconds); earlier or later must hold as well
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr.decode(), stderr.decode()
    assert process.returncode != 0
