"""TensorRT 10 engines built from our ONNX graphs, with metadata checked before an engine is used.

Each engine DIR/<network>.plan has DIR/<network>.plan.json beside it: TensorRT version, GPU compute
capability, precision, refittable, optimization-profile shapes and the sha256 of the ONNX graph it
came from. A plan only runs on the TensorRT version and GPU architecture that built it, so
`check_engine_compatible` refuses anything else with a message naming the file and both sides.
All builds in DIR share DIR/timing_cache.bin, so later builds skip kernel timing they already did.

Written against the documented TensorRT 10 Python API; `tensorrt` is imported only when building or
loading, so everything else here (profiles, metadata, checks, reuse decisions) works without it.

Not executed anywhere yet (no TensorRT in the build environment, nor on the GPU test machine): every
TensorRT call, i.e. build_engine (parser, builder config, profile, timing cache, serialization) and
the deserialization in load_engine, and all of runtime/backends/tensorrt_backend.py (execution
context, CUDA-graph capture and replay). tests/export/test_tensorrt.py runs the rest with the library
faked, and skips the end-to-end engine test, saying why, where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from export.manifest import TEMP_PREFIX, ArtifactError, Manifest, atomic_write_text
from export.onnx import ensure_onnx, stored_spec
from export.specs import NetworkSpec, ShapeProfile
from runtime.dtypes import PRECISIONS as RUNTIME_PRECISIONS

log = logging.getLogger("export")

PRECISIONS = tuple(RUNTIME_PRECISIONS)  # engines build in every precision the runtime names
TIMING_CACHE_NAME = "timing_cache.bin"
METADATA_SUFFIX = ".json"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine."""


class EngineMismatchError(ArtifactError):
    """An engine that cannot serve this request: other GPU, other TensorRT, shape outside its profile."""


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built. precision: fp16 (default) or bf16 enable reduced-precision kernels on
    top of the fp32 ONNX graph; refittable: weights can be swapped later without a rebuild;
    workspace_bytes: cap on TensorRT's scratch memory (None: TensorRT's default, the whole GPU)."""

    precision: str = "fp16"
    refittable: bool = False
    workspace_bytes: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {self.precision!r}")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({err}): install TensorRT 10 "
            "(`pip install tensorrt`) on a machine with an NVIDIA GPU"
        ) from None
    major = int(tensorrt.__version__.split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {tensorrt.__version__} is installed; this code needs TensorRT 10")
    return tensorrt


def current_gpu() -> dict:
    """{"compute_capability": "9.0", "name": ...} of CUDA device 0; a clear error without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return {"compute_capability": f"{major}.{minor}", "name": torch.cuda.get_device_name()}


def profile_json(spec: NetworkSpec, profile: ShapeProfile) -> dict[str, list[list[int]]]:
    """{input: [min shape, opt shape, max shape]} as JSON lists."""
    return {name: [list(shape) for shape in shapes] for name, shapes in spec.profile_shapes(profile).items()}


def engine_metadata(
    spec: NetworkSpec,
    profile: ShapeProfile,
    options: EngineOptions,
    *,
    tensorrt_version: str,
    gpu: dict,
    onnx_sha256: str,
) -> dict:
    return {
        "network": spec.name,
        "tensorrt_version": tensorrt_version,
        "compute_capability": gpu["compute_capability"],
        "gpu_name": gpu.get("name", ""),
        "precision": options.precision,
        "refittable": options.refittable,
        "profile": profile_json(spec, profile),
        "image_profile": profile.as_dict(),
        "onnx_sha256": onnx_sha256,
        "spec": spec.to_dict(),
    }


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + METADATA_SUFFIX)


def read_metadata(plan_path: str | os.PathLike) -> dict:
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise ArtifactError(f"TensorRT engine {plan_path} does not exist")
    path = metadata_path(plan_path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} is missing: cannot tell which GPU and TensorRT built {plan_path}; rebuild the engine"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} is not readable engine metadata ({err})") from None
    required = ("tensorrt_version", "compute_capability", "profile", "onnx_sha256", "spec")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; rebuild the engine")
    return meta


def check_engine_compatible(
    meta: dict, plan_path, *, tensorrt_version: str, compute_capability: str, onnx_sha256: str | None = None
) -> None:
    """Refuse an engine built by another TensorRT, for another GPU architecture, or from another graph."""
    if meta["tensorrt_version"] != tensorrt_version:
        raise EngineMismatchError(
            f"{plan_path} was built by TensorRT {meta['tensorrt_version']} but "
            f"TensorRT {tensorrt_version} is installed; rebuild the engine"
        )
    if meta["compute_capability"] != compute_capability:
        raise EngineMismatchError(
            f"{plan_path} was built for GPU compute capability {meta['compute_capability']} "
            f"({meta.get('gpu_name') or 'unknown GPU'}) but this GPU is {compute_capability}; rebuild the "
            "engine on this GPU"
        )
    if onnx_sha256 is not None and meta["onnx_sha256"] != onnx_sha256:
        raise EngineMismatchError(
            f"{plan_path} was built from an ONNX graph with sha256 "
            f"{meta['onnx_sha256'][:12]}... but the graph now is {onnx_sha256[:12]}... "
            "(another model or export); rebuild the engine"
        )


def check_shapes_in_profile(meta: dict, shapes: dict[str, tuple], plan_path) -> None:
    """Every input shape must lie within the engine's optimization profile, dim by dim. A context longer
    than the profile's is named as such: the prompt's chunks against the engine's most."""
    spec = NetworkSpec.from_dict(meta["spec"])
    for name, shape in shapes.items():
        if name not in meta["profile"]:
            raise EngineMismatchError(f"{plan_path} has no input {name!r}; its inputs are {sorted(meta['profile'])}")
        low, _, high = meta["profile"][name]
        dims = next(tensor.dims for tensor in spec.inputs if tensor.name == name)
        if "T" in dims and len(shape) == len(dims):
            _check_context_length(shape[dims.index("T")], high[dims.index("T")], spec.chunk_tokens, plan_path)
        if len(shape) != len(low) or any(not lo <= size <= hi for size, lo, hi in zip(shape, low, high)):
            raise EngineMismatchError(
                f"{plan_path}: input {name!r} shape {list(shape)} is outside the engine's profile "
                f"(min {low}, max {high}); export again with wider --min/--max"
            )


def _check_context_length(tokens: int, most: int, chunk: int, plan_path) -> None:
    if tokens > most:
        chunks = -(-tokens // chunk)
        raise EngineMismatchError(
            f"{plan_path}: a prompt of {chunks} chunks needs context length {chunks}*{chunk} = {tokens}; this "
            f"engine takes at most {most} ({most // chunk} chunks): shorten the prompt (fewer BREAKs or tokens)"
        )


def engine_key_fields(
    name: str, onnx_sha256: str, profile: ShapeProfile, options: EngineOptions, tensorrt_version: str, gpu: dict
) -> dict:
    return {
        "artifact": f"{name}.plan",
        "onnx": onnx_sha256,
        "profile": profile.as_dict(),
        "precision": options.precision,
        "refittable": options.refittable,
        "workspace_bytes": options.workspace_bytes,
        "tensorrt": tensorrt_version,
        "compute_capability": gpu["compute_capability"],
    }


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    spec: NetworkSpec,
    profile: ShapeProfile,
    options: EngineOptions,
    timing_cache_path: Path,
    meta: dict,
) -> None:
    """Parse onnx_path, build a serialized engine with one optimization profile, write it and its
    metadata, and save the (grown) timing cache for the next build."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads <name>.onnx.data beside the graph too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    for name, (low, mid, high) in spec.profile_shapes(profile).items():
        optimization_profile.set_shape(name, low, mid, high)
    config.add_optimization_profile(optimization_profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    temp = plan_path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{plan_path.name}")
    with open(temp, "wb") as handle:
        handle.write(serialized)
    os.replace(temp, plan_path)
    atomic_write_text(metadata_path(plan_path), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    cache_temp = timing_cache_path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{timing_cache_path.name}")
    with open(cache_temp, "wb") as handle:
        handle.write(memoryview(config.get_timing_cache().serialize()))
    os.replace(cache_temp, timing_cache_path)


def ensure_engines(
    out_dir,
    model_path,
    *,
    profile: ShapeProfile | None = None,
    options: EngineOptions | None = None,
    networks=None,
    device="cpu",
    progress: bool = True,
) -> dict[str, Path]:
    """fp32 ONNX graphs, then one engine per network (default: every network the model has); reuses
    whatever the manifest says is current."""
    profile = profile or ShapeProfile()
    options = options or EngineOptions()
    trt = import_tensorrt()
    gpu = current_gpu()
    graphs = ensure_onnx(
        out_dir, model_path, dtype="fp32", profile=profile, device=device, networks=networks, progress=progress
    )
    manifest = Manifest.open(out_dir)
    timing_cache = manifest.out_dir / TIMING_CACHE_NAME
    plans = {}
    for name in graphs:
        spec = stored_spec(manifest, name)
        spec.profile_shapes(profile)  # shape errors before a long build
        onnx_sha = manifest.artifacts[f"{name}.onnx"]["files"][f"{name}.onnx"]["sha256"]
        fields = engine_key_fields(name, onnx_sha, profile, options, trt.__version__, gpu)
        decision = manifest.decide(f"{name}.plan", fields)
        plan = manifest.out_dir / f"{name}.plan"
        plans[name] = plan
        if decision.reuse:
            log.info("%s.plan: reused (up to date)", name)
            continue
        log.info(
            "%s.plan: %s; building (%s, profile %s .. %s)",
            name,
            decision.reason,
            options.precision,
            profile.min,
            profile.max,
        )
        manifest.forget(f"{name}.plan")
        meta = engine_metadata(spec, profile, options, tensorrt_version=trt.__version__, gpu=gpu, onnx_sha256=onnx_sha)
        build_engine(manifest.out_dir / f"{name}.onnx", plan, spec, profile, options, timing_cache, meta)
        manifest.record(
            f"{name}.plan",
            [plan.name, metadata_path(plan).name],
            fields,
            info={"network": name, "precision": options.precision, "profile": profile.as_dict()},
            extra_files=[TIMING_CACHE_NAME],
        )
    return plans


def refit_engine(engine, arrays: dict, plan_path) -> None:
    """Replace named weights of a refittable engine ({ONNX initializer name: numpy array}) in place.

    TensorRT names an engine's weights after the ONNX initializers it parsed; a name it does not know
    (a weight it folded into a constant it cannot refit) is an error naming the engine and the weight.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise EngineMismatchError(
            f"{plan_path}: TensorRT cannot refit weight {unknown[0]!r} ({len(unknown)} unknown of {len(arrays)}); "
            "is the engine refittable and built from this graph?"
        )
    for name, array in arrays.items():
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise EngineMismatchError(f"{plan_path}: TensorRT refused new values for weight {name!r} {array.shape}")
    missing = refitter.get_missing_weights()
    if missing:  # only weights TensorRT ties together (one layer's kernel and bias) can be missing
        raise EngineMismatchError(f"{plan_path}: the refit also needs weights {sorted(missing)[:5]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT failed to refit {plan_path} (see its log above)")


def load_engine(plan_path: str | os.PathLike, *, onnx_sha256: str | None = None):
    """Deserialize a plan after checking its metadata against this machine; returns (engine, meta)."""
    trt = import_tensorrt()
    plan_path = Path(plan_path)
    meta = read_metadata(plan_path)
    check_engine_compatible(
        meta,
        plan_path,
        tensorrt_version=trt.__version__,
        compute_capability=current_gpu()["compute_capability"],
        onnx_sha256=onnx_sha256,
    )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise ArtifactError(f"TensorRT could not deserialize {plan_path} (truncated or corrupt); rebuild the engine")
    return engine, meta
