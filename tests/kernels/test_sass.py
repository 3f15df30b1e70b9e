"""Ahead-of-time sm_90 (H100) compilation of every kernel configuration: no spills, shared memory fits.

Runs tests/kernels/sass_compile.py in a subprocess without TRITON_INTERPRET (the interpreter swaps out
@triton.jit functions at decoration time). Needs no GPU: ptxas and cuobjdump ship with triton.
Each kernel module lists its configurations in aot_configs() (the convention of kernels/aot.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.kernels.other_triton import DEVICE_TRITON, triton_folder

SCRIPT = pathlib.Path(__file__).with_name("sass_compile.py")
REPO_ROOT = SCRIPT.parents[2]
H100_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum per block; the SM has 228 KB


def _compile_all(module: str, triton_version: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_version != "installed":
        # The other version's folder first on the path: the subprocess imports that triton, ours otherwise.
        env["PYTHONPATH"] = os.pathsep.join([str(triton_folder(triton_version)), str(REPO_ROOT)])
    # One compile process per core, each taking every n-th configuration (ptxas is single-threaded).
    shards = os.cpu_count() or 1
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), module, "--shard", f"{k}/{shards}"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(shards)
    ]
    rows = []
    for process in processes:
        out, err = process.communicate(timeout=1800)
        assert process.returncode == 0, f"sass_compile.py {module} failed:\n{err[-4000:]}"
        rows += [json.loads(line) for line in out.splitlines() if line.strip()]
    return rows


KERNEL_MODULES = [
    "kernels.group_norm",
    "kernels.attention",
    "kernels.geglu",
    "kernels.layer_norm",
    "kernels.bias_residual_add",
    "kernels.fused_linear",
]
# The installed triton, and the GPU machines' version (skipped where the two are the same).
TRITON_VERSIONS = ["installed", DEVICE_TRITON]


@pytest.mark.slow
@pytest.mark.parametrize("triton_version", TRITON_VERSIONS)
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_sm90_sass_has_no_spills_and_fits_shared_memory(module, triton_version):
    import triton

    if triton_version == triton.__version__:
        pytest.skip(f"triton {triton_version} is the installed version: compiled by the 'installed' case")
    rows = _compile_all(module, triton_version)
    assert rows, f"{module}.aot_configs() is empty"
    compiled_by = {row["triton"] for row in rows}
    expected = triton.__version__ if triton_version == "installed" else triton_version
    assert compiled_by == {expected}, f"compiled by triton {compiled_by}, expected {expected}"
    for row in rows:
        print(
            f"{row['kernel']} warps={row['num_warps']} regs={row['registers']} "
            f"shared={row['shared_bytes']}B {row['constexprs']}"
        )
    spilling = [r for r in rows if r["spill_instructions"] or r["local_bytes"]]
    assert not spilling, "register spills (LDL/STL) in:\n" + "\n".join(map(json.dumps, spilling))
    too_big = [r for r in rows if r["shared_bytes"] > H100_SHARED_PER_BLOCK]
    assert not too_big, "shared memory over 227 KB in:\n" + "\n".join(map(json.dumps, too_big))
