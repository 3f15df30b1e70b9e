"""A CPU stand-in for the CUDA-graph API runtime/graphs.py calls (tests only; runtime/ never sees it).

`FakeCudaGraphs()` has what CudaGraphDenoiser uses of `torch.cuda`: CUDAGraph, graph(g, pool=...),
Stream, stream, current_stream, graph_pool_handle, empty_cache. Inside `with graph(g)` every aten op
is recorded (a TorchDispatchMode); `g.replay()` runs the recorded ops again on the same tensor objects
and writes each result into the tensor the capture produced. So, as with a real graph, a replay reads
whatever its input buffers hold now and writes into fixed output buffers, and graph k+1 sees what graph
k wrote only through those buffers. Also as with a real capture:
- the Python around the ops runs once: Python floats and step indices are baked in;
- what the capture computed is not a result: new outputs are filled with NaN when it ends, and writes
  it made into tensors that existed before it are undone;
- a host sync (.item(), a data-dependent branch) inside a capture raises.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# Ops that read a device value back to the host: illegal while a CUDA graph captures.
_HOST_SYNCS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default}


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into (in-place self, out=), from its schema."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        written += _tensors(value)
    return written


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []  # (func, args, kwargs, result)
        self.new_storages: set[int] = set()  # storages the capture allocated
        self.saved: dict[int, tuple] = {}  # storage key -> (storage, its bytes before the capture)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNCS:
            raise RuntimeError(
                f"fake CUDA graph: {func} syncs with the host during capture (a real capture fails here)"
            )
        for target in _written(func, args, kwargs):
            key = _storage_key(target)
            if key not in self.new_storages and key not in self.saved:
                self.saved[key] = (target.untyped_storage(), target.untyped_storage().clone())
        result = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        for out in _tensors(result):
            if _storage_key(out) not in inputs:
                self.new_storages.add(_storage_key(out))
        self.ops.append((func, args, kwargs, result))
        return result

    def finish(self) -> None:
        """Undo the capture's writes into older tensors and poison what it allocated."""
        for storage, before in self.saved.values():
            storage.copy_(before)
        self.saved.clear()
        for _, _, _, result in self.ops:
            for out in _tensors(result):
                if _storage_key(out) in self.new_storages and out.is_floating_point():
                    out.fill_(float("nan"))


class FakeCUDAGraph:
    def __init__(self, api: FakeCudaGraphs):
        self._api = api
        self._ops: list[tuple] | None = None

    def replay(self) -> None:
        if self._ops is None:
            raise RuntimeError("fake CUDA graph: replay() before a capture finished")
        self._api.replays += 1
        with torch.inference_mode():
            for func, args, kwargs, recorded in self._ops:
                fresh = func(*args, **kwargs)
                for target, value in zip(_tensors(recorded), _tensors(fresh)):
                    if not _same_memory(target, value):
                        target.copy_(value)

    def reset(self) -> None:
        self._ops = None


class FakeStream:
    def wait_stream(self, other: FakeStream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeCudaGraphs:
    """The torch.cuda subset of CUDA graphs, on the CPU; counts captures and replays for tests."""

    OutOfMemoryError = torch.cuda.OutOfMemoryError

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self._default_stream = FakeStream()
        self._capturing = False

    def CUDAGraph(self) -> FakeCUDAGraph:  # noqa: N802 - torch.cuda's name
        return FakeCUDAGraph(self)

    @contextlib.contextmanager
    def graph(self, cuda_graph: FakeCUDAGraph, pool=None, stream=None):
        if self._capturing:
            raise RuntimeError("fake CUDA graph: nested capture")
        recorder = _Recorder()
        self._capturing = True
        try:
            with recorder:
                yield cuda_graph
        finally:
            self._capturing = False
            with torch.inference_mode():
                recorder.finish()
        cuda_graph._ops = recorder.ops
        self.captures += 1

    def graph_pool_handle(self) -> object:
        return object()

    def Stream(self) -> FakeStream:  # noqa: N802 - torch.cuda's name
        return FakeStream()

    def current_stream(self) -> FakeStream:
        return self._default_stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        yield stream

    def empty_cache(self) -> None:
        pass
