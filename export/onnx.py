"""ONNX export of a model's networks (fp32 or fp16, opset 17), cleaned with onnxslim, checked with onnx.checker.

SD 1.x / 2.x have four networks, the SDXL base five (both text encoders), the refiner four (text encoder 2
only); export.specs.NETWORKS_OF lists them. Each graph also records where each torch weight went
(export/weight_map.py), so the deployed backends can apply LoRAs without exporting again.

Exporter choice: torch.onnx.export(..., dynamo=False), the TorchScript tracer. The dynamo exporter
needs `onnxscript`, which is not installed here, and its dynamic shapes (torch.export Dim ranges,
guards on every size expression of the UNet) have changed between torch 2.6 and 2.14; the tracer's
`dynamic_axes` behaves the same on torch 2.11 (the GPU machine) and 2.14 (here), and the tests check
the exported graph at shapes other than the traced sample.

Export always runs the eager reference layers: if a backend swapped Triton kernels into the model
(runtime/backends/triton_layers.py), `reference_layers` swaps plain `GroupNorm` / `AttentionCore` back
for the duration of the export, so the graph holds only standard ONNX ops (GroupNorm becomes the
exporter's InstanceNormalization-based decomposition, attention becomes MatMul/Softmax).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from export.graph_stamp import check_stamp, stamp
from export.manifest import TEMP_PREFIX, ArtifactError, Manifest, tool_versions, weights_digests
from export.specs import NETWORKS, NETWORKS_OF, ImageShape, NetworkSpec, ShapeProfile, network_specs, sdxl_network_specs
from export.weight_map import build_weight_map, record_weight_map
from runtime.dtypes import PRECISIONS

log = logging.getLogger("export")

OPSET = 17
# Bump when a change here alters the exported graphs, so existing artifacts are rebuilt.
# 2: graphs carry the digest of their weights (export/graph_stamp.py); 3: and their weight map (weight_map.py);
# 4: the UNet's context length is a dynamic axis (long prompts: K x 77 tokens), no longer fixed at 77
EXPORTER_VERSION = 4
# Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000
# The graph dtypes export writes; bf16 exists only as a TensorRT engine precision (export/tensorrt.py).
DTYPES = {name: PRECISIONS[name] for name in ("fp32", "fp16")}
COMPONENT_OF = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
SDXL_KINDS = ("sdxl", "sdxl-refiner")


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    for name, value in DTYPES.items():
        if dtype == value:
            return name
    raise ValueError(f"ONNX export supports dtypes {sorted(DTYPES)}, got {dtype!r}")


# Wrappers holding a LoRA-able network keep it as `.model`: export_network maps its weights (weight_map.py).
class _TextEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


class _SDXLTextEncoder(_TextEncoder):
    def forward(self, input_ids):
        # (penultimate hidden state, pooled state; encoder 2's projected): what SDXL conditions on.
        return self.model.penultimate_and_pooled(input_ids)


class _UNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states)


class _SDXLUNet(_UNet):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.model(sample, timestep, encoder_hidden_states, text_embeds=text_embeds, time_ids=time_ids)


class _VAEDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


class _VAEEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        # The posterior's mean and log-variance: img2img samples mean + std * noise from both.
        return self.vae.encode_moments(images)


_WRAPPERS = {"text_encoder": _TextEncoder, "unet": _UNet, "vae_decoder": _VAEDecoder, "vae_encoder": _VAEEncoder}
_SDXL_WRAPPERS = {**_WRAPPERS, "text_encoder": _SDXLTextEncoder, "text_encoder_2": _SDXLTextEncoder, "unet": _SDXLUNet}


def network_module(components, name: str) -> nn.Module:
    """The module that computes network `name` from the loaded components, with ONNX's signature."""
    kind = getattr(components, "kind", "sd1")  # a bare namespace of modules (tests) is SD 1.x-shaped
    wrappers = _SDXL_WRAPPERS if kind in SDXL_KINDS else _WRAPPERS
    if name not in wrappers or name not in NETWORKS_OF[kind]:
        raise ValueError(f"a {kind} model has no network {name!r}; it has {list(NETWORKS_OF[kind])}")
    return wrappers[name](getattr(components, COMPONENT_OF[name])).eval()


@contextlib.contextmanager
def reference_layers(model: nn.Module):
    """Temporarily put plain GroupNorm / AttentionCore / GEGLU / resnet / transformer block / Transformer2D /
    1x1 conv modules back where a backend substituted kernel-backed subclasses (their custom ops have no ONNX
    symbolic; fused q/k/v projections export as plain GEMMs)."""
    from runtime.models.blocks import GEGLU, BasicTransformerBlock, ResnetBlock2D, Transformer2DModel
    from runtime.models.layers import AttentionCore, GroupNorm
    from runtime.models.substitution import rebind, replace_modules, restore_modules
    from runtime.models.time_projection import TimeProjection

    swapped = []
    # Resnets and the time projection too (runtime/backends/triton_resnet.py: a custom op, folded biases),
    # transformer blocks (triton_transformer.py: the LayerNorm kernels), and 1x1 convs run as GEMMs
    # (pointwise_conv.py), so the graph holds plain Conv nodes; Transformer2D too (triton_gemm.py: proj_out and
    # its residual as one fused GEMM; the GEGLU and ff-output GEMMs go back with GEGLU and the block).
    bases = (GroupNorm, AttentionCore, GEGLU, ResnetBlock2D, BasicTransformerBlock, Transformer2DModel, TimeProjection)
    for base in (*bases, nn.Conv2d):
        swapped += replace_modules(
            model,
            lambda m, base=base: isinstance(m, base) and type(m) is not base,
            lambda m, base=base: rebind(m, base),
        )
    if swapped:
        log.info("export uses the eager reference layers: %d substituted layers swapped back", len(swapped))
    try:
        yield model
    finally:
        restore_modules(swapped)


_ONNX_FLOAT_TYPES = {"Float": (1, torch.float32), "Half": (10, torch.float16), "BFloat16": (16, torch.bfloat16)}


def _sdpa_symbolic(g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """aten::scaled_dot_product_attention as standard ONNX ops, every constant in the query's dtype.

    The TorchScript exporter's own symbolic builds the causal mask in fp32 and adds it to fp16
    scores, an ill-typed graph that onnx.checker rejects (our CLIP text encoder is causal). The math
    is the same: softmax(q k^T * scale + causal mask) v, with the scale split as sqrt on q and k.
    """
    from torch.onnx import symbolic_helper

    if not symbolic_helper._is_none(attn_mask) or dropout_p != 0.0 or enable_gqa:
        raise ValueError(
            "ONNX export handles scaled_dot_product_attention without attn_mask, "
            "dropout or grouped-query attention only (what our models use)"
        )
    onnx_type, torch_type = _ONNX_FLOAT_TYPES[query.type().scalarType()]

    def const(values, dtype=torch_type):
        return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

    def last_dims(tensor, start, stop):
        return g.op("Slice", g.op("Shape", tensor), const([start], torch.int64), const([stop], torch.int64))

    scale = symbolic_helper._maybe_get_const(scale, "f")
    if symbolic_helper._is_none(scale) or scale is None:
        head_dim = g.op("Cast", last_dims(query, -1, 2**62), to_i=1)
        scale = g.op("Div", const([1.0], torch.float32), g.op("Sqrt", head_dim))
    else:
        scale = const([float(scale)], torch.float32)
    root_scale = g.op("Cast", g.op("Sqrt", scale), to_i=onnx_type)
    key_t = g.op("Transpose", key, perm_i=[0, 1, 3, 2])
    scores = g.op("MatMul", g.op("Mul", query, root_scale), g.op("Mul", key_t, root_scale))
    if is_causal:
        size = g.op("Concat", last_dims(query, -2, -1), last_dims(key, -2, -1), axis_i=0)
        lower = g.op("Trilu", g.op("Expand", const([1.0]), size), upper_i=0)
        mask = g.op("Where", g.op("Equal", lower, const([0.0])), const([-float("inf")]), const([0.0]))
        scores = g.op("Add", scores, mask)
    return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), value)


@contextlib.contextmanager
def _attention_symbolic(opset: int):
    """Use _sdpa_symbolic for the duration of one export (registered, then removed again)."""
    from torch.onnx import symbolic_helper

    name = "aten::scaled_dot_product_attention"
    symbolic = symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")(_sdpa_symbolic)
    torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(name, opset)


def _module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    tensor = next(module.parameters())
    return tensor.dtype, tensor.device


def export_network(
    module: nn.Module,
    spec: NetworkSpec,
    out_dir: str | os.PathLike,
    *,
    sample=None,
    opset: int = OPSET,
    weights_digest: str | None = None,
) -> list[str]:
    """Export `module` (a `network_module`) to out_dir/<spec.name>.onnx; return the file names written.

    The graph is traced near `sample` (an ImageShape, default the default profile's opt shape; see
    _odd_latent) with every batch / height / width / context-token axis dynamic. Graphs whose weights exceed
    ~1.8 GB keep them in <name>.onnx.data beside the graph. Files appear in out_dir only once written and checked.
    """
    import onnx
    import onnxslim

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype, device = _module_dtype_device(module)
    dtype_name(dtype)
    # The UNet is traced with a 2-chunk context: a size frozen into the trace would then break the common
    # 1-chunk case, not hide behind it (as _odd_latent does for the latent size).
    image = _odd_latent(sample or ShapeProfile().opt, spec.factor)
    inputs = spec.sample_inputs(image, dtype=dtype, device=device, chunks=2)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    graph_name, data_name = f"{spec.name}.onnx", f"{spec.name}.onnx.data"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=TEMP_PREFIX) as work:
        raw = Path(work) / "raw" / graph_name
        raw.parent.mkdir()
        with reference_layers(module), _attention_symbolic(opset), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The exporter's note that it leaves some Slice ops unfolded (onnxslim folds them next).
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            # CLIP's pooling gathers at argmax positions, which are never negative.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            torch.onnx.export(
                module,
                inputs,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True,
            )
        # onnxslim's shape inference measures the whole proto, which fails above 2 GB: for large
        # graphs it is skipped there and onnx's path-based shape inference runs in the checker below.
        slim = onnxslim.slim(str(raw), no_shape_infer=external)
        _check_interface(slim, spec, raw)
        if isinstance(getattr(module, "model", None), nn.Module):
            record_weight_map(slim, build_weight_map(slim, module.model))
        final = Path(work) / "final" / graph_name
        final.parent.mkdir()
        if weights_digest is not None:
            stamp(slim, weights_digest)
        onnx.save_model(
            slim,
            str(final),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        del slim
        # The path-based checker reads external data from disk: it works above 2 GB too.
        onnx.checker.check_model(str(final), full_check=True)
        files = [graph_name] + ([data_name] if external else [])
        for name in files:
            os.replace(final.parent / name, out_dir / name)
    return files


def _odd_latent(image: ImageShape, factor: int) -> ImageShape:
    """The traced sample, grown by one latent cell where its latent size is even.

    The UNet upsamples by 2 when the latent size divides by 2**levels and to each skip's exact
    size otherwise: a Python branch on shapes, which tracing freezes. Tracing at an odd latent size
    records the size-matching path, which is right for every size; an even trace would fail at
    sizes such as 520 px (latent 65).
    """
    height = image.height + (factor if (image.height // factor) % 2 == 0 else 0)
    width = image.width + (factor if (image.width // factor) % 2 == 0 else 0)
    return ImageShape(image.batch, height, width)


def _check_interface(model, spec: NetworkSpec, path: Path) -> None:
    """The cleaned graph must keep our tensor names, a symbolic dim on every dynamic input axis of the spec
    (a traced size can freeze an axis silently), and only standard ONNX ops."""
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise ArtifactError(
            f"{path}: exported graph has inputs {inputs} / outputs {outputs}, expected "
            f"{spec.input_names} / {spec.output_names}"
        )
    axes = spec.dynamic_axes()
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, axis_name in axes[value.name].items():
            if not dims[axis].dim_param:
                raise ArtifactError(
                    f"{path}: input {value.name!r} axis {axis} ({axis_name}) came out fixed at "
                    f"{dims[axis].dim_value}, not dynamic"
                )
    custom = sorted({node.op_type for node in model.graph.node if node.domain not in ("", "ai.onnx")})
    if custom:
        raise ArtifactError(
            f"{path}: exported graph holds non-standard ops {custom}; export must use the reference layers"
        )


def onnx_key_fields(name: str, weights_digest: str, dtype: str, opset: int) -> dict:
    """What an ONNX artifact depends on; any change rebuilds it. The weights digest covers the
    component's config too, so the interface (a function of config and this code) is not repeated.
    The shape profile is not here: the graph's axes are dynamic, only TensorRT engines depend on it."""
    return {
        "artifact": f"{name}.onnx",
        "weights": weights_digest,
        "dtype": dtype,
        "opset": opset,
        "tools": tool_versions(("torch", "onnx", "onnxslim")),
        "exporter": EXPORTER_VERSION,
    }


def ensure_onnx(
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    *,
    dtype="fp32",
    profile: ShapeProfile | None = None,
    components=None,
    device="cpu",
    networks=None,
    opset: int = OPSET,
    progress: bool = True,
) -> dict[str, Path]:
    """Make out_dir hold up-to-date ONNX graphs of `networks` (default: all the model has) of the model at model_path.

    Reuses what the manifest says is current, rebuilds what is stale or missing, and raises
    ArtifactError for damaged files or a directory holding files that are not ours. `components`
    (already loaded, in `dtype`) avoids loading the model again; otherwise it is loaded only if
    something must be built. Returns {network: path of its .onnx}.
    """
    profile = profile or ShapeProfile()
    dtype = dtype_name(dtype)
    present = model_networks(model_path, components)
    if present is None:
        components = _load(model_path, dtype, device)
        present = model_networks(model_path, components)
    networks = present if networks is None else tuple(networks)
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        raise ValueError(f"unknown networks {unknown}; choose from {list(NETWORKS)}")
    absent = [name for name in networks if name not in present]
    if absent:
        raise ValueError(f"{model_path} has no network {absent[0]!r}; its networks are {list(present)}")
    manifest = Manifest.open(out_dir, create=False)  # refuses a foreign directory before any work
    digests = weights_digests(model_path, sorted({COMPONENT_OF[name] for name in networks}))
    todo = []
    for name in networks:
        fields = onnx_key_fields(name, digests[COMPONENT_OF[name]], dtype, opset)
        decision = manifest.decide(f"{name}.onnx", fields)
        log.info("%s.onnx: %s", name, "reused (up to date)" if decision.reuse else decision.reason)
        if decision.reuse:
            check_stamp(manifest.out_dir / f"{name}.onnx", fields["weights"], manifest.path)
        else:
            todo.append((name, fields))
    if todo and components is None:
        components = _load(model_path, dtype, device)
    specs = specs_of(components) if todo else {}
    for name, fields in _progress(todo, progress):
        manifest.forget(f"{name}.onnx")
        log.info("exporting %s.onnx (%s, opset %d)", name, dtype, opset)
        files = export_network(
            network_module(components, name),
            specs[name],
            manifest.out_dir,
            sample=profile.opt,
            opset=opset,
            weights_digest=fields["weights"],
        )
        manifest.record(
            f"{name}.onnx",
            files,
            fields,
            info={
                "network": name,
                "dtype": dtype,
                "opset": opset,
                "sample_shape": str(profile.opt),
                "source": str(model_path),
                "spec": specs[name].to_dict(),
            },
        )
    return {name: manifest.out_dir / f"{name}.onnx" for name in networks}


def _load(model_path, dtype: str, device):
    from runtime.weights import load_components

    log.info("loading %s (%s, %s) for export", model_path, dtype, device)
    return load_components(model_path, device=device, dtype=DTYPES[dtype])


def specs_of(components) -> dict[str, NetworkSpec]:
    if components.kind in SDXL_KINDS:
        text = components.text_encoder.config if components.text_encoder is not None else None
        return sdxl_network_specs(components.unet.config, components.vae.config, text, components.text_encoder_2.config)
    return network_specs(components.unet.config, components.vae.config, components.text_encoder.config)


def model_networks(model_path, components=None) -> tuple[str, ...] | None:
    """The networks of the model at model_path (NETWORKS_OF its kind), read without loading its weights:
    a diffusers folder by its subfolders, a .safetensors file by its tensor names; None for a pickle file."""
    if components is not None:
        return NETWORKS_OF[components.kind]
    path = Path(model_path)
    if path.is_dir():
        kind = "sdxl-refiner" if not (path / "text_encoder").is_dir() else "sdxl"
        if not (path / "text_encoder_2").is_dir():
            kind = "sd1"  # SD 1.x and 2.x have the same networks
        return NETWORKS_OF[kind]
    if not path.is_file():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.suffix != ".safetensors":
        return None  # a pickle checkpoint: known once loaded
    from runtime.single_file import detect_layout
    from runtime.tensor_header import read_header

    shapes = {name: tuple(info.shape) for name, info in read_header(path).items()}
    return NETWORKS_OF[detect_layout(shapes, str(path)).kind]


def stored_spec(manifest: Manifest, name: str) -> NetworkSpec:
    """The spec recorded when <name>.onnx was exported."""
    entry = manifest.verify(f"{name}.onnx")
    try:
        return NetworkSpec.from_dict(entry["info"]["spec"])
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"{manifest.path}: entry {name}.onnx has no usable spec ({err})") from None


def _progress(items, enabled: bool):
    if not enabled or not items:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="export", unit="network")
