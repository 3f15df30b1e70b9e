"""Preflight of gpu_check.sh (seconds, not minutes): can this machine produce numbers at all?

    python -m benchmarks.preflight --json OUT/preflight.json [--dry-run]

Checks versions; a C compiler and Python.h (Triton builds its launcher at the first launch); pytest and
Pillow; one tiny Triton kernel compiled and run; diffusers importable with its huggingface_hub; free GPU
memory. Prints one verdict line ("preflight: GO ..." or "preflight: NO-GO: <reasons>") and exits 1 on
NO-GO, so that the script stops at once instead of spending the window on steps that cannot measure.
--dry-run (the CPU rehearsal) runs the kernel under the Triton interpreter and needs no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pathlib
import shutil
import sys
import sysconfig
import time

MIN_FREE_GPU_GIB = 8.0  # SD 1.5 fp16 rows (three pipelines), the kernel benchmarks' 1 GiB copies


def _check(name: str, fatal: bool, fn) -> dict:
    start = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as err:  # noqa: BLE001 -- a check that raises has failed, with its reason
        ok, detail = False, f"{type(err).__name__}: {err}"
    return {
        "check": name,
        "ok": bool(ok),
        "fatal": fatal and not ok,
        "detail": detail,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _versions():
    import torch

    triton = importlib.util.find_spec("triton") and importlib.import_module("triton").__version__
    return True, {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
    }


def _compiler_and_headers():
    compiler = next((shutil.which(cc) for cc in ("cc", "gcc", "clang") if shutil.which(cc)), None)
    header = pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h"
    return bool(compiler and header.is_file()), {
        "compiler": compiler,
        "Python.h": str(header) if header.is_file() else f"missing ({header})",
    }


def _modules(*names):
    def check():
        missing = [name for name in names if importlib.util.find_spec(name) is None]
        return not missing, "all importable" if not missing else f"missing: {', '.join(missing)}"

    return check


def _triton_kernel(device: str):
    def check():
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)

        x = torch.arange(100, dtype=torch.float32, device=device)
        add_one[(triton.cdiv(100, 64),)](x, 100, BLOCK=64)
        expected = torch.arange(100, dtype=torch.float32, device=device) + 1
        return bool(torch.equal(x, expected)), f"add-one kernel on {device}"

    return check


def _diffusers():
    import diffusers
    import huggingface_hub

    return True, {"diffusers": diffusers.__version__, "huggingface_hub": huggingface_hub.__version__}


def _free_gpu_memory():
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    free, total = torch.cuda.mem_get_info()
    return free / 2**30 >= MIN_FREE_GPU_GIB, {
        "device": torch.cuda.get_device_name(),
        "free_gib": round(free / 2**30, 1),
        "total_gib": round(total / 2**30, 1),
    }


def run(dry_run: bool) -> list[dict]:
    device = "cpu" if dry_run else "cuda"
    return [
        _check("versions", False, _versions),
        # Compiled Triton needs both; the interpreter (the dry run) needs neither.
        _check("c compiler and Python.h", not dry_run, _compiler_and_headers),
        _check("pytest", False, _modules("pytest")),
        _check("Pillow", True, _modules("PIL")),  # every pipeline row returns PIL images
        _check("triton kernel", True, _triton_kernel(device)),
        _check("diffusers with huggingface_hub", False, _diffusers),  # only the baseline row needs it
        *([] if dry_run else [_check("free GPU memory", True, _free_gpu_memory)]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the checks")
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: Triton interpreter, no GPU")
    args = parser.parse_args(argv)
    from runtime.bench.results import write_result

    checks = run(args.dry_run)
    fatal = [c for c in checks if c["fatal"]]
    warnings = [c["check"] for c in checks if not c["ok"] and not c["fatal"]]
    verdict = (
        "NO-GO: " + "; ".join(f"{c['check']}: {c['detail']}" for c in fatal)
        if fatal
        else "GO" + (f" (without: {', '.join(warnings)})" if warnings else "")
    )
    write_result(args.json, "preflight", {"dry_run": args.dry_run}, checks, verdict=verdict)
    print(f"preflight: {verdict}", flush=True)
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
