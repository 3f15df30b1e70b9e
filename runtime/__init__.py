"""A fast Stable Diffusion inference runtime.

    import runtime
    pipe = runtime.load("path/to/model", backend="triton", device="cuda", dtype="fp16")
    images = pipe.generate("an astronaut riding a horse", seed=0)
    requests = [runtime.GenerationRequest("a fox", seed=1), runtime.GenerationRequest("an owl", seed=2)]
    fox, owl = pipe.generate_batch(requests)   # one denoising loop; each as generate would give it

Importing this package imports no torch (`python -m runtime --help` answers at once); `load` and
`GenerationRequest` (runtime/generation_options.py, imported on first use) do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing torch here would cost `--help` seconds
    import torch

__all__ = ["GenerationRequest", "load"]


def __getattr__(name: str):
    if name == "GenerationRequest":  # on first use: it imports torch
        from runtime.generation_options import GenerationRequest

        return GenerationRequest
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def load(
    path,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer_path=None,
    prediction_type: str | None = None,
    cuda_graphs: bool | None = None,
    vae=None,
    lora_dir=None,
    embeddings_dir=None,
    **backend_options,
):
    """Load a diffusers folder or a single-file checkpoint and return a ready `Pipeline`.

    backend: "torch" (eager reference), "triton" (our kernels), "onnxruntime" or "tensorrt" (exported
    graphs; pass engine_dir=...); backend_options go to the backend.
    cuda_graphs: replay denoising steps from CUDA graphs; default on for "triton" on a CUDA device.
    dtype: a torch.dtype or a name ("fp32", "fp16", "bf16", ...).
    Pickle checkpoints (.ckpt/.bin) are refused unless allow_pickle=True (then read weights-only).
    vae: a separate VAE (diffusers folder or .safetensors) to use instead of the checkpoint's.
    lora_dir: the folder `<lora:NAME:0.8>` in prompts is resolved in (NAME.safetensors), applied per call.
    embeddings_dir: a folder of textual-inversion embeddings (NAME.safetensors), used as NAME or <NAME>.
    """
    from pathlib import Path

    for name, folder in (("lora_dir", lora_dir), ("embeddings_dir", embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise NotADirectoryError(f"{name} {folder} is not a folder")
    from runtime import backends
    from runtime.pipeline import Pipeline
    from runtime.weights import load_components

    components = load_components(
        path,
        device=device,
        dtype=dtype,
        variant=variant,
        allow_pickle=allow_pickle,
        tokenizer_path=tokenizer_path,
        prediction_type=prediction_type,
    )
    if vae is not None:
        from runtime.weights import load_vae

        components.vae = load_vae(vae, components, device=device, dtype=dtype, allow_pickle=allow_pickle)
    components = backends.prepare(backend, components, **backend_options)
    pipe = Pipeline(components, backend=backend, cuda_graphs=cuda_graphs)
    pipe.lora_dir, pipe.embeddings_dir = lora_dir, embeddings_dir
    return pipe
