"""A second Triton version beside the installed one, for the AOT compile checks.

The GPU machines run triton 3.6 while this project develops on a newer one, and register allocation
changes between versions: a kernel that fits under one can spill under the other. So each kernel module's
configurations are compiled under both. The other version is installed once with pip into a cache
folder of its own (`--no-deps --target`: nothing in the environment changes) and reached by putting that
folder first on the compile subprocess's PYTHONPATH.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# The version the lent GPU machines have (the developers' guide: torch 2.11, triton 3.6).
DEVICE_TRITON = "3.6.0"
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "sd-runtime"


def triton_folder(version: str) -> pathlib.Path:
    """A folder holding triton==`version` alone, installed on first use; built in a temporary folder
    beside it and renamed into place, so an interrupted install never leaves a half-filled one."""
    folder = CACHE / f"triton-{version}"
    if (folder / "triton" / "__init__.py").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".triton-{version}-", dir=CACHE))
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(staging),
                f"triton=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pip could not install triton=={version}:\n{done.stderr[-2000:]}")
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
