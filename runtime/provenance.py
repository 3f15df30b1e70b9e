"""Where a measurement came from: GPU, library versions, git SHA, time. Stamped on every result file."""
from __future__ import annotations

import datetime
import functools
import pathlib
import platform
import subprocess

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """HEAD of the checkout this code runs from, suffixed -dirty when tracked files differ."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + "-dirty" if dirty else sha) or "unknown"


@functools.cache
def _package_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def environment() -> dict:
    """Provenance of a run: GPU name, torch / triton / CUDA versions, git SHA, UTC time."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "onnxruntime": _package_version("onnxruntime"),
        "diffusers": _package_version("diffusers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
