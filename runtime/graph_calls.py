"""One network call replayed from a CUDA graph: the text encoder(s) and the VAE decode of a request.

`CudaGraphCall(fn)` captures `fn(*tensors)` once per key (every input's shape, dtype and device, plus
what the caller adds: e.g. the VAE's dtype) into static buffers, and replays it after that: the copy-in,
one graph launch and the copy-out instead of a launch per kernel. Its conventions are the denoiser's
(runtime/graphs.py): the graph API injected (tests/fake_cuda_graphs.py on the CPU), one lock, a warm-up
on a side stream before capture (Triton compiles and autotunes, cuBLAS picks kernels, the allocator
sizes its blocks: none of that may happen while capturing), outputs handed out as copies, a bounded LRU
cache of entries sharing one memory pool (replays never overlap, and every output is copied out before
the lock is released, so scratch memory can be shared: the cache costs about one call's activations plus
each entry's inputs and outputs), and out of memory during capture releases the cache with a clear error.

Before each call the weights' addresses are compared with those the graphs were captured against
(runtime/graph_weights.py); if any moved, every entry is dropped and the call captures anew.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from runtime.graph_cache import GraphCache

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CallKey:
    """What one captured call is specialised to; a call that differs in any field captures anew."""

    inputs: tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]  # (shape, dtype, device) per input
    extra: tuple = ()  # what else the call depends on, from the caller

    def describe(self) -> str:
        name = lambda value: str(value).removeprefix("torch.")  # noqa: E731
        shapes = ", ".join(f"{'x'.join(map(str, s))} {name(d)}" for s, d, _ in self.inputs)
        return shapes + (f" ({', '.join(map(name, self.extra))})" if self.extra else "")


@dataclasses.dataclass
class _Entry:
    graph: object  # the CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static copies of the call's inputs
    outputs: tuple[torch.Tensor, ...]  # what the captured call wrote
    single: bool  # fn returned one tensor, not a tuple


class CudaGraphCall(GraphCache):
    """A bounded LRU cache of captured calls of `fn`, replayed on request."""

    def __init__(
        self,
        fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
        name: str,
        weights: Sequence[torch.nn.Module] = (),
        max_entries: int = 4,
        graph_api=None,
    ):
        """fn: pure tensor work on its tensor arguments, returning a tensor or a tuple of tensors (no host
        sync). name: for logs and errors. weights: the modules whose tensors fn reads (dropped graphs when
        they move). graph_api: torch.cuda unless a test passes a stand-in."""
        super().__init__(max_entries, graph_api, weights)
        self._fn = fn
        self.name = name

    def __call__(self, *args: torch.Tensor, extra: tuple = ()):
        """fn(*args), replayed (captured first for a new key); the result is the caller's, not a buffer."""
        key = CallKey(tuple((tuple(t.shape), t.dtype, t.device) for t in args), tuple(extra))
        with self._lock, torch.inference_mode():
            self._drop_if_weights_moved(f"{self.name}: weights moved since capture; dropping %d CUDA graphs")
            entry = self._entries.get(key)
            if entry is None:
                entry = self._capture_or_explain(key, args)
            self._entries.move_to_end(key)
            for static, value in zip(entry.inputs, args):
                static.copy_(value)
            entry.graph.replay()
            outputs = tuple(t.clone() for t in entry.outputs)
        return outputs[0] if entry.single else outputs

    def _capture_or_explain(self, key: CallKey, args) -> _Entry:
        log.info("capturing a CUDA graph of the %s for %s", self.name, key.describe())
        return self._capture_new(
            key,
            lambda: self._capture(args),
            f"CUDA ran out of memory capturing the {self.name} graph for {key.describe()}; "
            f"its graph cache was released",
        )

    def _capture(self, args) -> _Entry:
        cuda = self._cuda
        static_inputs = tuple(t.clone() for t in args)
        side = cuda.Stream()
        side.wait_stream(cuda.current_stream())
        with cuda.stream(side):
            self._fn(*static_inputs)
        cuda.current_stream().wait_stream(side)
        graph = cuda.CUDAGraph()
        with cuda.graph(graph, pool=self._graph_pool()):
            result = self._fn(*static_inputs)
        single = isinstance(result, torch.Tensor)
        outputs = (result,) if single else tuple(result)
        if not all(isinstance(t, torch.Tensor) for t in outputs):
            raise TypeError(f"the {self.name} graph must return a tensor or a tuple of tensors")
        return _Entry(graph=graph, inputs=static_inputs, outputs=outputs, single=single)


class GraphedTextEncoder:
    """A text encoder as the prompt code calls it, replayed from CUDA graphs: `encoder(ids)` and SDXL's
    `encoder.penultimate_and_pooled(ids)`, one capture per ids shape. Every other attribute is the
    module's own (its parameters; the layers that clip_skip and textual inversion run eagerly)."""

    def __init__(self, module: torch.nn.Module, name: str, graph_api=None, max_entries: int = 8):
        self.module = module
        self.forward_graphs = CudaGraphCall(module, name, [module], max_entries, graph_api)
        self.pooled_graphs = None
        if hasattr(module, "penultimate_and_pooled"):
            self.pooled_graphs = CudaGraphCall(
                module.penultimate_and_pooled, f"{name} (penultimate and pooled)", [module], max_entries, graph_api
            )

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.forward_graphs(input_ids)

    def penultimate_and_pooled(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pooled_graphs is None:
            raise AttributeError(f"{type(self.module).__name__} has no penultimate_and_pooled")
        if inputs_embeds is not None:  # textual inversion's inputs: eager, as SD 1.x's embeddings run
            return self.module.penultimate_and_pooled(input_ids, inputs_embeds)
        return self.pooled_graphs(input_ids)

    def runners(self) -> list[CudaGraphCall]:
        return [r for r in (self.forward_graphs, self.pooled_graphs) if r is not None]

    def __getattr__(self, name: str):
        if name == "module":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)
