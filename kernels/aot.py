"""The ahead-of-time compilation convention every kernel module follows.

A kernel module defines `aot_configs() -> list[AotConfig]`: every (kernel, signature, constexprs,
num_warps, num_stages) its launcher can compile for real model shapes. It is a function, so importing a
module does no work; tests/kernels/sass_compile.py compiles each entry for sm_90 and checks its SASS.
`signature` maps every argument name to a Triton type string ("*fp16", "i32", "fp32", or "constexpr"
for names given in `constexprs`); a ":16" suffix marks a value divisible by 16, as Triton's JIT would
specialise it (notation of triton/tools/compile.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class AotConfig(NamedTuple):
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


def signature_like_jit(fn, args: dict, constexprs: dict, count_args=()) -> tuple[dict, dict]:
    """Signature and constexprs as Triton's JIT would specialise these argument values: a torch dtype
    stands for a 16-byte-aligned pointer to it (torch allocations are); an int equal to 1 becomes a
    constexpr; an int divisible by 16 gets ":16", except the `count_args` (loop bounds and sizes whose
    divisibility does not change the generated memory access, so leaving it out keeps the compile
    count small)."""
    signature, constants = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.dtype):
            signature[name] = f"*{_POINTER_TYPES[value]}:16"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32:16" if value % 16 == 0 and name not in count_args else "i32"
    return signature, constants


def config(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int, count_args=()) -> AotConfig:
    """One entry: `fn` specialised to these argument values (see signature_like_jit)."""
    return AotConfig(fn, *signature_like_jit(fn, args, constexprs, count_args), num_warps, num_stages)


def unique(configs: list[AotConfig]) -> list[AotConfig]:
    """`configs` without repeats (many model shapes share one specialisation), first-seen order."""
    seen = {}
    for entry in configs:
        key = (
            entry.fn.__name__,
            tuple(entry.signature.items()),
            tuple(entry.constexprs.items()),
            entry.num_warps,
            entry.num_stages,
        )
        seen.setdefault(key, entry)
    return list(seen.values())
