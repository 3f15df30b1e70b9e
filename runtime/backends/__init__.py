"""Backends decide what executes the networks; the models and the pipeline never know which one runs.

A backend is a function that takes the loaded components and returns them ready to run: `torch` leaves
the eager modules as they are (the reference); `triton` swaps our kernels in by module substitution;
`onnxruntime` and `tensorrt` replace the networks by exported graphs / engines (engine_dir=...).
"""

from __future__ import annotations

from collections.abc import Callable

from runtime.backends.onnxruntime_backend import prepare_onnxruntime
from runtime.backends.tensorrt_backend import prepare_tensorrt
from runtime.backends.torch_backend import prepare_torch
from runtime.backends.triton_backend import prepare_triton

BACKENDS: dict[str, Callable] = {
    "torch": prepare_torch,
    "triton": prepare_triton,
    "onnxruntime": prepare_onnxruntime,
    "tensorrt": prepare_tensorrt,
}

# Backends that run exported artifacts and so need an engine_dir.
EXPORTED = ("onnxruntime", "tensorrt")


def prepare(name: str, components, **options):
    """Make `components` (runtime.weights.Components) run on backend `name`."""
    try:
        prepare_fn = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return prepare_fn(components, **options)
