"""Denoising steps replayed from CUDA graphs: one launch per step instead of hundreds of kernel launches.

For each request shape the runner captures one graph per step index (UNet on the guided batch, the
guidance combine and the scheduler update, exactly the eager step), chained: graph i reads the latents
graph i-1 wrote. Per-step graphs (rather than one graph for the whole loop) keep the per-step callback,
the progress bar and inpainting's latent blending working, at the cost of one graph launch per step.

Everything a graph reads lives in static buffers owned by its cache entry: the initial latents, the text
context, the guidance scale (a device scalar, so a new guidance value needs no new capture), the
pre-drawn ancestral noise and the inpainting conditioning. A call copies its inputs in, replays, and
copies the result out, under a lock, so concurrent callers never see each other's buffers.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

# A step function: (scheduler, latents, i, context, guidance, noise_i, conditioning) -> new latents.
StepFn = Callable[..., torch.Tensor]


def scheduler_identity(scheduler) -> str:
    """Class and full config of a scheduler: two samplers of one class (DPM++ 2M with and without
    Karras sigmas) must not share graphs."""
    settings = ", ".join(f"{k}={v!r}" for k, v in sorted(scheduler.config.items()))
    return f"{type(scheduler).__name__}({settings})"


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """What a captured graph is specialised to; a request that differs in any field captures anew."""

    latent_shape: tuple[int, ...]
    context_shape: tuple[int, ...]
    dtype: torch.dtype
    scheduler: str
    steps: int
    start: int
    has_noise: bool
    conditioning_shape: tuple[int, ...] | None

    def describe(self) -> str:
        b, c, h, w = self.latent_shape
        sampler = self.scheduler.split("(", 1)[0]
        return (f"batch {b}, latents {c}x{h}x{w}, {str(self.dtype).removeprefix('torch.')}, "
                f"{sampler} x{self.steps} from step {self.start}")


@dataclasses.dataclass
class _Entry:
    scheduler: object                     # keeps the multistep history tensors the graphs read alive
    graphs: list[torch.cuda.CUDAGraph]    # graph k runs step start + k
    chain: list[torch.Tensor]             # chain[k] is graph k's input latents, chain[k + 1] its output
    context: torch.Tensor
    guidance: torch.Tensor
    noise: torch.Tensor | None
    conditioning: torch.Tensor | None


class CudaGraphDenoiser:
    """A bounded LRU cache of captured denoising loops, replayed on request."""

    def __init__(self, step_fn: StepFn, max_entries: int = 4):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._step_fn = step_fn
        self._entries: collections.OrderedDict[GraphKey, _Entry] = collections.OrderedDict()
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # One memory pool for every entry. Safe because replays never overlap (the lock, one stream)
        # and no graph reads pool memory written by another entry's graphs: each replay starts from
        # its static inputs, and within an entry graph k reads only what graph k-1 of the same replay
        # wrote. Scratch blocks are shared, so the cache costs about one UNet's activations, not one
        # per entry.
        self._pool = None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Release every graph and its memory pool."""
        with self._lock:
            self._entries.clear()
            self._pool = None
        torch.cuda.empty_cache()

    def run(self, key: GraphKey, scheduler, latents: torch.Tensor, context: torch.Tensor, guidance: float,
            noise: torch.Tensor | None, conditioning: torch.Tensor | None,
            between_steps: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
            progress: Callable[[range], range] = lambda r: r) -> torch.Tensor:
        """Steps key.start .. key.steps-1 on `latents`; returns new latents (not a static buffer).

        `scheduler` is set up for the request (timesteps, begin index); a new capture works on a copy.

        `between_steps(i, latents)` runs eagerly after step i; a tensor it returns replaces the latents
        (inpainting's blend); it may raise to stop the run.
        """
        with self._lock, torch.inference_mode():
            entry = self._entries.get(key)
            if entry is None:
                entry = self._capture_or_explain(key, scheduler, latents, context, noise, conditioning)
            self._entries.move_to_end(key)
            entry.chain[0].copy_(latents)
            entry.context.copy_(context)
            entry.guidance.fill_(guidance)
            if noise is not None:
                entry.noise.copy_(noise)
            if conditioning is not None:
                entry.conditioning.copy_(conditioning)
            for k in progress(range(len(entry.graphs))):
                entry.graphs[k].replay()
                if between_steps is not None:
                    replaced = between_steps(key.start + k, entry.chain[k + 1])
                    if replaced is not None and replaced is not entry.chain[k + 1]:
                        entry.chain[k + 1].copy_(replaced)
            return entry.chain[-1].clone()

    def _capture_or_explain(self, key, scheduler, latents, context, noise, conditioning) -> _Entry:
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        log.info("capturing CUDA graphs for a new request shape: %s", key.describe())
        try:
            entry = self._capture(key, copy.deepcopy(scheduler), latents, context, noise, conditioning)
        except torch.cuda.OutOfMemoryError as err:
            self._entries.clear()
            self._pool = None
            torch.cuda.empty_cache()
            raise RuntimeError(f"CUDA ran out of memory capturing the denoising graphs for {key.describe()}; "
                               f"the graph cache was released. Try a smaller batch or size.") from err
        self._entries[key] = entry
        return entry

    def _capture(self, key, scheduler, latents, context, noise, conditioning) -> _Entry:
        static_latents = latents.clone()
        static_context = context.clone()
        # fp32, as a Python float would enter the kernels: replay then matches eager bit for bit.
        static_guidance = torch.zeros((), device=latents.device, dtype=torch.float32)
        static_noise = None if noise is None else noise.clone()
        static_conditioning = None if conditioning is None else conditioning.clone()

        def step(i: int, x: torch.Tensor) -> torch.Tensor:
            return self._step_fn(scheduler, x, i, static_context, static_guidance,
                                 None if static_noise is None else static_noise[i], static_conditioning)

        # Warm up on a side stream: Triton compiles and autotunes, cuBLAS picks its kernels, the
        # caching allocator sizes its blocks; none of that may happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            x = static_latents
            # Every step, not just one: samplers take other code paths on their first and last steps,
            # and no kernel may be loaded or compiled for the first time while a graph is capturing.
            for i in range(key.start, key.steps):
                x = step(i, x)
        torch.cuda.current_stream().wait_stream(side)
        scheduler.reset()

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graphs, chain = [], [static_latents]
        with torch.inference_mode():
            for i in range(key.start, key.steps):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = step(i, chain[-1])
                graphs.append(graph)
                chain.append(out)
        return _Entry(scheduler=scheduler, graphs=graphs, chain=chain, context=static_context,
                      guidance=static_guidance, noise=static_noise, conditioning=static_conditioning)
