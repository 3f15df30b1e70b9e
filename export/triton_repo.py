"""`python -m export --format triton-repo`: a model repository for NVIDIA Triton Inference Server.

    REPO/text_encoder/config.pbtxt, REPO/text_encoder/1/text_encoder.onnx (+ its manifest.json)
    REPO/unet/...,  REPO/vae_decoder/...                  (ONNX Runtime backend, batch in the dims)
    REPO/pipeline/config.pbtxt, REPO/pipeline/1/model.py  (Python backend: export/triton_python_model.py)
    REPO/pipeline/1/tokenizer/, scheduler_config.json, pipeline.json (sizes and the networks' names)

Each network's version folder is an ordinary export directory (export/onnx.py's ensure_onnx), so a
second run reuses up-to-date graphs. The repository is ours only if it holds nothing but these
folders; anything else is refused before any work. Serve it with
`tritonserver --model-repository REPO` (the Python model needs `pip install sd-runtime` in Triton's
Python environment). txt2img only: img2img / inpainting are not in the Python model yet.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from export.manifest import ArtifactError
from export.specs import NetworkSpec, ShapeProfile

NETWORKS = ("text_encoder", "unet", "vae_decoder")  # what the txt2img loop calls
PIPELINE = "pipeline"
MODEL_FILE = "model.py"
_VERSION = "1"
_TYPES = {"float": {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16"}, "float32": "TYPE_FP32", "int64": "TYPE_INT64"}
# (name, Triton type) of the Python model's inputs: all [1], all but the prompt optional.
PIPELINE_INPUTS = (
    ("prompt", "TYPE_STRING"),
    ("negative_prompt", "TYPE_STRING"),
    ("scheduler", "TYPE_STRING"),
    ("steps", "TYPE_INT32"),
    ("width", "TYPE_INT32"),
    ("height", "TYPE_INT32"),
    ("guidance", "TYPE_FP32"),
    ("seed", "TYPE_INT64"),
)
_PIPELINE_FILES = {MODEL_FILE, "tokenizer", "scheduler_config.json", "pipeline.json"}


def _dims(tensor) -> str:
    return "[ " + ", ".join("-1" if isinstance(dim, str) else str(dim) for dim in tensor.dims) + " ]"


def _tensor_type(tensor, dtype: str) -> str:
    kind = _TYPES[tensor.dtype]
    return kind[dtype] if isinstance(kind, dict) else kind


def network_config(spec: NetworkSpec, dtype: str, kind: str = "KIND_GPU") -> str:
    """config.pbtxt of one ONNX network: max_batch_size 0, so the batch is the first of each tensor's dims
    (the UNet's guided batch is twice the image batch, which Triton's own batching would not know)."""

    def block(tensors) -> str:
        rows = [f'  {{ name: "{t.name}" data_type: {_tensor_type(t, dtype)} dims: {_dims(t)} }}' for t in tensors]
        return ",\n".join(rows)

    return (
        f'name: "{spec.name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        f'default_model_filename: "{spec.name}.onnx"\n'
        f"input [\n{block(spec.inputs)}\n]\noutput [\n{block(spec.outputs)}\n]\n"
        f"instance_group [ {{ kind: {kind} count: 1 }} ]\n"
    )


def pipeline_config() -> str:
    rows = [
        f'  {{ name: "{name}" data_type: {kind} dims: [ 1 ]{"" if name == "prompt" else " optional: true"} }}'
        for name, kind in PIPELINE_INPUTS
    ]
    return (
        f'name: "{PIPELINE}"\nbackend: "python"\nmax_batch_size: 0\n'
        "input [\n" + ",\n".join(rows) + "\n]\n"
        'output [\n  { name: "image" data_type: TYPE_UINT8 dims: [ 1, -1, -1, 3 ] }\n]\n'
        # the loop itself is host code; its BLS calls run the networks on their own instances
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


def _check_ours(repo: Path) -> None:
    """Refuse a repository holding anything we would not write (we replace only our own files)."""
    if repo.exists() and not repo.is_dir():
        raise ArtifactError(f"{repo} is a file, not a model repository folder")
    if not repo.is_dir():
        return
    allowed = {name: {"config.pbtxt", _VERSION} for name in (*NETWORKS, PIPELINE)}
    for entry in repo.iterdir():
        if entry.name not in allowed or entry.is_symlink() or not entry.is_dir():
            raise ArtifactError(f"{repo} holds {entry.name!r}, which this export did not write; choose an empty folder")
        for inner in entry.iterdir():
            if inner.name not in allowed[entry.name] or inner.is_symlink():
                raise ArtifactError(f"{inner} was not written by this export; refusing to write into {repo}")
    pipeline_version = repo / PIPELINE / _VERSION
    if pipeline_version.is_dir():
        foreign = sorted(p.name for p in pipeline_version.iterdir() if p.name not in _PIPELINE_FILES)
        if foreign:
            raise ArtifactError(f"{pipeline_version} holds {foreign[0]!r}, which this export did not write")


def _write_text(path: Path, text: str) -> None:
    """Through a temp file in the same folder: a crash never leaves a half-written config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _copy_folder(source: Path, target: Path) -> None:
    """Copy a folder into place whole: built beside the target, then swapped in."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.is_file() and not item.is_symlink():
                shutil.copyfile(item, staging / item.name)
        if target.exists():
            shutil.rmtree(target)  # ours: _check_ours accepted it
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_triton_repo(
    repo,
    model_path,
    *,
    dtype: str = "fp32",
    profile: ShapeProfile | None = None,
    device: str = "cpu",
    progress: bool = True,
    kind: str = "KIND_GPU",
) -> dict[str, Path]:
    """Write (or bring up to date) the repository; returns {model name: its config.pbtxt}."""
    from export.onnx import ensure_onnx, specs_of
    from runtime.weights import load_components

    repo, model_path = Path(repo), Path(model_path)
    _check_ours(repo)
    if not model_path.is_dir():
        raise ValueError(
            f"--format triton-repo needs a diffusers folder (its tokenizer and scheduler), got {model_path}"
        )
    components = load_components(model_path, device=device, dtype={"fp32": "fp32", "fp16": "fp16"}[dtype])
    if getattr(components, "kind", "sd1") == "sdxl":
        raise ValueError("--format triton-repo supports SD 1.x / 2.x; SDXL's second text encoder is not wired in yet")
    specs = specs_of(components)
    repo.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name in NETWORKS:
        ensure_onnx(
            repo / name / _VERSION,
            model_path,
            dtype=dtype,
            profile=profile,
            components=components,
            device=device,
            networks=[name],
            progress=progress,
        )
        configs[name] = repo / name / "config.pbtxt"
        _write_text(configs[name], network_config(specs[name], dtype, kind))
    version = repo / PIPELINE / _VERSION
    version.mkdir(parents=True, exist_ok=True)
    _write_text(version / MODEL_FILE, (Path(__file__).parent / "triton_python_model.py").read_text(encoding="utf-8"))
    _copy_folder(model_path / "tokenizer", version / "tokenizer")
    _write_text(version / "scheduler_config.json", json.dumps(dict(components.scheduler_config), indent=2))
    vae_factor = specs["vae_decoder"].factor
    sample_size = components.unet.config.sample_size or 64
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    description = {
        "networks": {name: name for name in NETWORKS},
        "vae_factor": vae_factor,
        "latent_channels": components.vae.config.latent_channels,
        "scaling_factor": components.vae.config.scaling_factor,
        "width": sample_size * vae_factor,
        "height": sample_size * vae_factor,
    }
    _write_text(version / "pipeline.json", json.dumps(description, indent=2))
    configs[PIPELINE] = repo / PIPELINE / "config.pbtxt"
    _write_text(configs[PIPELINE], pipeline_config())
    return configs
