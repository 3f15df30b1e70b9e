"""Where a measurement came from: device, library versions, git SHA, time. One stamp on every result file.

The GPU machine receives a copy of the working tree without .git: `python -m runtime.bench.provenance
--write-sha` (run by gpu_check.sh wherever git works) records HEAD in benchmarks/.git_sha beforehand, and
git_sha() reads that file when git cannot answer.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform
import subprocess

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHA_FILE = REPO_ROOT / "benchmarks" / ".git_sha"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _sha_from_git() -> str | None:
    """HEAD of this checkout, suffixed -dirty when tracked files differ; None without git or .git."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + "-dirty" if dirty else sha


def write_sha_file(path: pathlib.Path = SHA_FILE) -> dict:
    """Record HEAD (and when) in `path` for a machine that gets the tree without .git."""
    sha = _sha_from_git()
    if sha is None:
        raise RuntimeError(f"git cannot read HEAD in {REPO_ROOT}: no SHA to record in {path}")
    stamp = {"sha": sha, "written_utc": _utc_now()}
    path.write_text(json.dumps(stamp) + "\n")
    return stamp


def git_sha() -> str:
    """The checkout's SHA from git, else from benchmarks/.git_sha ("<sha> (recorded <utc>)"), else "unknown"."""
    sha = _sha_from_git()
    if sha is not None:
        return sha
    try:
        stamp = json.loads(SHA_FILE.read_text())
        return f"{stamp['sha']} (recorded {stamp['written_utc']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.cache
def _package_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def provenance() -> dict:
    """{"device", "versions", "git", "utc"}: the stamp every result file carries."""
    import torch  # here, so that --write-sha runs in a blink

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            **{name: _package_version(name) for name in ("triton", "onnxruntime", "diffusers")},
        },
        "git": git_sha(),
        "utc": _utc_now(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.provenance", description=__doc__.splitlines()[0])
    parser.add_argument("--write-sha", action="store_true", help=f"record HEAD in {SHA_FILE.relative_to(REPO_ROOT)}")
    if parser.parse_args().write_sha:
        print(write_sha_file()["sha"])
    else:
        print(json.dumps(provenance(), indent=2))
