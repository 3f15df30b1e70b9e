"""A stand-in for Triton's `triton_python_backend_utils` module: the Python model's BLS calls run the
repository's ONNX models in-process with onnxruntime, found as Triton would (config.pbtxt's name and
default_model_filename under REPO/<model>/1/)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnxruntime

from tests.export import pbtxt


class TritonError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"pb_utils.Tensor {name!r} needs a numpy array, got {type(array).__name__}")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors, error: TritonError | None = None):
        self.output_tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(request, name: str):
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response, name: str):
    return next((t for t in response.output_tensors if t.name() == name), None)


def make_module(repo: Path) -> types.ModuleType:
    """The module to put at sys.modules["triton_python_backend_utils"], serving `repo`'s ONNX models."""
    sessions: dict[str, onnxruntime.InferenceSession] = {}
    calls: list[str] = []

    def session(model_name: str) -> onnxruntime.InferenceSession:
        if model_name not in sessions:
            config = pbtxt.plain(pbtxt.parse((repo / model_name / "config.pbtxt").read_text()))
            assert config["backend"] == "onnxruntime" and config["name"] == model_name
            path = repo / model_name / "1" / config["default_model_filename"]
            sessions[model_name] = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sessions[model_name]

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model_name, self.requested, self._inputs = model_name, list(requested_output_names), list(inputs)

        def inputs(self):
            return self._inputs

        def exec(self):
            calls.append(self.model_name)
            try:
                feeds = {t.name(): t.as_numpy() for t in self._inputs}
                outputs = session(self.model_name).run(self.requested, feeds)
            except Exception as err:  # Triton reports a failed model call as an error response
                return InferenceResponse([], TritonError(f"{type(err).__name__}: {err}"))
            return InferenceResponse([Tensor(n, a) for n, a in zip(self.requested, outputs)])

    module = types.ModuleType("triton_python_backend_utils")
    for name, value in dict(
        Tensor=Tensor,
        InferenceResponse=InferenceResponse,
        InferenceRequest=InferenceRequest,
        TritonError=TritonError,
        get_input_tensor_by_name=get_input_tensor_by_name,
        get_output_tensor_by_name=get_output_tensor_by_name,
    ).items():
        setattr(module, name, value)
    module.calls = calls
    return module


class Request:
    """What Triton hands the Python model's execute(): a request holding input tensors."""

    def __init__(self, **inputs):
        self._inputs = [Tensor(name, value) for name, value in inputs.items()]

    def inputs(self):
        return self._inputs
