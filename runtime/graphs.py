"""Denoising steps replayed from CUDA graphs: one launch per step instead of hundreds of kernel launches.

For each request shape the runner captures one graph per step index (UNet on the guided batch, the
guidance combine and the scheduler update, exactly the eager step), chained: graph i reads the latents
graph i-1 wrote. Per-step graphs (rather than one graph for the whole loop) keep the per-step callback,
the progress bar and inpainting's latent blending working, at the cost of one graph launch per step.

Everything a graph reads lives in static buffers owned by its cache entry: the initial latents, the
request's named step inputs (text context, inpainting conditioning, SDXL's added conditioning: any
tensor the step function takes by name), the guidance scale (a device scalar, or a [B] vector of one
scale per latent row for a batch of requests with different scales; a new value needs no new capture),
the pre-drawn ancestral noise, and the scheduler's multistep history
(zeroed before every replay, as eager starts each image from an empty history). A call copies its
inputs in, replays, and hands out copies, under a lock, so concurrent callers never see each other's
buffers and nothing a caller holds is overwritten by the next run.

The graph API is a constructor argument (torch.cuda by default), so tests can drive the same code on
the CPU with a stand-in (tests/fake_cuda_graphs.py).

Before each run the UNet's weight addresses are compared with those the graphs were captured against
(runtime/graph_weights.py): if any moved (`.to()`, a re-stacked fused weight), every entry is dropped and
the run captures anew. In-place writes (LoRA merges) keep the graphs, which replay the new weights.
The text encoders and the VAE decode have their own runner with the same conventions (runtime/graph_calls.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from runtime.graph_cache import GraphCache

log = logging.getLogger(__name__)

# A step function: step_fn(scheduler, latents, i, guidance=..., noise_i=..., **inputs) -> new latents,
# where `inputs` are the request's named static tensors (e.g. context=..., conditioning=...), and
# guidance a 0-d or [B] fp32 tensor (Pipeline.denoise_step).
StepFn = Callable[..., torch.Tensor]


def scheduler_identity(scheduler) -> str:
    """Class and full config of a scheduler: two samplers of one class (DPM++ 2M with and without
    Karras sigmas) must not share graphs."""
    settings = ", ".join(f"{k}={v!r}" for k, v in sorted(scheduler.config.items()))
    return f"{type(scheduler).__name__}({settings})"


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """What a captured graph is specialised to; a request that differs in any field captures anew."""

    latent_shape: tuple[int, ...]  # its first dimension is the batch size
    dtype: torch.dtype
    scheduler: str
    steps: int  # the schedule's length
    start: int
    end: int  # graphs run steps start .. end-1 (end < steps: a refiner finishes)
    has_noise: bool
    inputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # (name, shape, dtype), sorted by name
    guidance_shape: tuple[int, ...] = ()  # (): one scale; (B,): one per latent row

    @classmethod
    def for_run(
        cls,
        scheduler,
        latents: torch.Tensor,
        start: int,
        noise: torch.Tensor | None,
        inputs: Mapping[str, torch.Tensor],
        end: int | None = None,
        guidance: float | torch.Tensor = 0.0,
    ) -> GraphKey:
        signature = tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in inputs.items()))
        end = scheduler.num_steps if end is None else end
        return cls(
            tuple(latents.shape),
            latents.dtype,
            scheduler_identity(scheduler),
            scheduler.num_steps,
            start,
            end,
            noise is not None,
            signature,
            tuple(guidance.shape) if isinstance(guidance, torch.Tensor) else (),
        )

    def describe(self) -> str:
        b, c, h, w = self.latent_shape
        sampler = self.scheduler.split("(", 1)[0]
        return (
            f"batch {b}, latents {c}x{h}x{w}, {str(self.dtype).removeprefix('torch.')}, "
            f"{sampler} x{self.steps} steps {self.start}..{self.end - 1}"
        )


@dataclasses.dataclass
class _Entry:
    scheduler: object  # keeps the multistep history tensors the graphs read alive
    graphs: list  # CUDAGraph objects; graph k runs step start + k
    chain: list[torch.Tensor]  # chain[k] is graph k's input latents, chain[k + 1] its output
    inputs: dict[str, torch.Tensor]  # the static copies of the request's named step inputs
    guidance: torch.Tensor
    noise: torch.Tensor | None


class CudaGraphDenoiser(GraphCache):
    """A bounded LRU cache of captured denoising loops, replayed on request."""

    def __init__(self, step_fn: StepFn, max_entries: int = 4, graph_api=None, weights: Sequence[torch.nn.Module] = ()):
        """graph_api: what provides CUDAGraph, graph, Stream, stream, current_stream, graph_pool_handle
        and empty_cache; torch.cuda unless a test passes a stand-in. weights: the modules whose tensors
        the step reads (the UNet): the graphs are dropped when any of them moves."""
        super().__init__(max_entries, graph_api, weights)
        self._step_fn = step_fn

    def run(
        self,
        scheduler,
        latents: torch.Tensor,
        guidance: float | torch.Tensor,
        *,
        inputs: Mapping[str, torch.Tensor | None],
        start: int = 0,
        end: int | None = None,
        noise: torch.Tensor | None = None,
        between_steps: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        progress: Callable[[range], range] = lambda r: r,
    ) -> torch.Tensor:
        """Steps start .. end-1 (end: scheduler.num_steps) on `latents`; returns new latents (not a static buffer).

        `scheduler` is set up for the request (timesteps, begin index); a new capture works on a clone.
        `inputs` are the step function's named tensor arguments; None values are left out (the step
        function's defaults apply). `guidance`: a float, or a [B] tensor of one scale per latent row.

        `between_steps(i, latents)` runs eagerly after step i on a copy the caller owns; the tensor it
        returns becomes the next step's input (inpainting's blend); it may raise to stop the run.
        """
        inputs = {name: t for name, t in inputs.items() if t is not None}
        key = GraphKey.for_run(scheduler, latents, start, noise, inputs, end, guidance)
        with self._lock, torch.inference_mode():
            self._drop_if_weights_moved("the UNet's weights moved since capture; dropping %d cached denoising loops")
            entry = self._entries.get(key)
            if entry is None:
                entry = self._capture_or_explain(key, scheduler, latents, inputs, noise)
            self._entries.move_to_end(key)
            entry.chain[0].copy_(latents)
            for name, tensor in inputs.items():
                entry.inputs[name].copy_(tensor)
            if isinstance(guidance, torch.Tensor):
                entry.guidance.copy_(guidance)
            else:
                entry.guidance.fill_(guidance)
            if noise is not None:
                entry.noise.copy_(noise)
            # The graphs read and write the history in place; a run that went NaN must not poison the next.
            entry.scheduler.reset()
            for k in progress(range(len(entry.graphs))):
                entry.graphs[k].replay()
                if between_steps is not None:
                    entry.chain[k + 1].copy_(between_steps(key.start + k, entry.chain[k + 1].clone()))
            return entry.chain[-1].clone()

    def _capture_or_explain(self, key, scheduler, latents, inputs, noise) -> _Entry:
        log.info("capturing CUDA graphs for a new request shape: %s", key.describe())
        return self._capture_new(
            key,
            lambda: self._capture(key, scheduler.clone(), latents, inputs, noise),
            f"CUDA ran out of memory capturing the denoising graphs for {key.describe()}; the graph cache was released",
        )

    def _capture(self, key, scheduler, latents, inputs, noise) -> _Entry:
        cuda = self._cuda
        static_latents = latents.clone()
        static_inputs = {name: t.clone() for name, t in inputs.items()}
        # fp32, as a Python float enters the kernels; the step does the guidance multiply in fp32, so a
        # Python float and this buffer give the same bits.
        static_guidance = torch.zeros(key.guidance_shape, device=latents.device, dtype=torch.float32)
        static_noise = None if noise is None else noise.clone()

        def step(i: int, x: torch.Tensor) -> torch.Tensor:
            return self._step_fn(
                scheduler,
                x,
                i,
                guidance=static_guidance,
                noise_i=None if static_noise is None else static_noise[i],
                **static_inputs,
            )

        # Warm up on a side stream: Triton compiles and autotunes, cuBLAS picks its kernels, the
        # caching allocator sizes its blocks; none of that may happen during capture.
        side = cuda.Stream()
        side.wait_stream(cuda.current_stream())
        with cuda.stream(side), torch.inference_mode():
            x = static_latents
            # Every step, not just one: samplers take other code paths on their first and last steps,
            # and no kernel may be loaded or compiled for the first time while a graph is capturing.
            for i in range(key.start, key.end):
                x = step(i, x)
        cuda.current_stream().wait_stream(side)
        scheduler.reset()

        graphs, chain = [], [static_latents]
        with torch.inference_mode():
            for i in range(key.start, key.end):
                graph = cuda.CUDAGraph()
                with cuda.graph(graph, pool=self._graph_pool()):
                    out = step(i, chain[-1])
                graphs.append(graph)
                chain.append(out)
        return _Entry(
            scheduler=scheduler,
            graphs=graphs,
            chain=chain,
            inputs=static_inputs,
            guidance=static_guidance,
            noise=static_noise,
        )
