"""Compile every AOT configuration of a kernel module for sm_90 and report its SASS resources.

Run as a script, in a process WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions
when they are decorated, so they could not be compiled):

    python tests/kernels/sass_compile.py kernels.group_norm [--limit N]

Convention (kernels/aot.py; every kernel module follows it): the module defines `aot_configs()`, a
list of AotConfig(fn, signature, constexprs, num_warps, num_stages). No GPU is needed.

Prints one JSON object per line: kernel, constexprs, num_warps, registers, shared memory (bytes),
local + stack memory (bytes), and the number of LDL/STL instructions (register spills) in the SASS.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cuobjdump() -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _split_signature(fn, signature: dict) -> tuple[dict, dict]:
    """Strip ':16' suffixes into Triton's `tt.divisibility` attributes."""
    types, attrs = {}, {}
    for name, kind in signature.items():
        base, _, hint = kind.partition(":")
        types[name] = base
        if hint:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", int(hint)]]
    return types, attrs


def compile_one(fn, signature, constexprs, num_warps, num_stages, workdir: pathlib.Path, index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types, attrs = _split_signature(fn, signature)
    compiled = triton.compile(
        ASTSource(fn, types, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    cubin = workdir / f"{index}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    return {
        "triton": triton.__version__,
        "kernel": fn.__name__,
        "constexprs": {k: v for k, v in constexprs.items()},
        "signature": signature,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "registers": int(resources.get("REG", -1)),
        "shared_bytes": max(int(compiled.metadata.shared), int(resources.get("SHARED", 0))),
        "local_bytes": int(resources.get("LOCAL", 0)) + int(resources.get("STACK", 0)),
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="kernel module defining aot_configs(), e.g. kernels.group_norm")
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N configurations")
    parser.add_argument(
        "--shard", default="0/1", help="K/N: compile only configurations K, K+N, K+2N, ... (N processes in parallel)"
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("sass_compile.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    sys.path.insert(0, str(REPO_ROOT))
    module = importlib.import_module(args.module)
    if not callable(getattr(module, "aot_configs", None)):
        sys.exit(f"sass_compile.py: {args.module} defines no aot_configs() (see kernels/aot.py)")
    configs = module.aot_configs()[: args.limit]
    shard, shards = (int(part) for part in args.shard.split("/"))
    with tempfile.TemporaryDirectory() as tmp:
        for index, config in list(enumerate(configs))[shard::shards]:
            print(json.dumps(compile_one(*config, pathlib.Path(tmp), index)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
