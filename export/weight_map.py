"""Which ONNX initializer holds each torch weight, recorded in the graph so deployed backends can update
weights in place (LoRA) without exporting again.

The TorchScript exporter names an initializer after its parameter (`model.conv_in.weight`) except where
constant folding stored a transposed copy for a MatMul (`onnx::MatMul_2500`), and onnxslim may merge
equal constants. So the map is found by value at export time, when the module and the graph are both in
memory: each 2-D / 4-D weight (what a LoRA can touch) is matched to the initializer holding its bytes,
or its transpose's. It is stored as JSON in the graph's metadata (covered by the manifest's sha256):

    {torch state-dict key: [initializer name, transposed (bool)]}

A key whose initializer also holds another key's weight (equal tensors merged into one) is left out:
updating it would change the other weight too. Keys left out cannot take a LoRA on exported graphs.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

WEIGHT_MAP_KEY = "sd-runtime.weight_map"


def _fingerprint(array) -> tuple:
    return array.shape, array.dtype.str, hashlib.blake2b(array.tobytes(), digest_size=16).digest()


def build_weight_map(model, module: nn.Module) -> dict[str, list]:
    """{state-dict key of `module`: [initializer name, transposed]} for an onnx.ModelProto exported from it
    (initializers in memory, as export_network holds them before saving)."""
    from onnx import numpy_helper

    by_value: dict[tuple, list[str]] = {}
    for initializer in model.graph.initializer:
        if len(initializer.dims) in (2, 4):
            by_value.setdefault(_fingerprint(numpy_helper.to_array(initializer)), []).append(initializer.name)
    found: dict[str, list] = {}
    claimed: dict[str, list[str]] = {}
    for key, tensor in module.state_dict().items():
        if tensor.ndim not in (2, 4) or not tensor.is_floating_point():
            continue
        forms = [(tensor, False)] + ([(tensor.t(), True)] if tensor.ndim == 2 else [])
        for form, transposed in forms:
            names = by_value.get(_fingerprint(form.detach().cpu().contiguous().numpy()))
            if names:
                found[key] = [names[0], transposed]
                claimed.setdefault(names[0], []).append(key)
                break
    shared = {key for keys in claimed.values() if len(keys) > 1 for key in keys}
    return {key: entry for key, entry in found.items() if key not in shared}


def record_weight_map(model, weight_map: dict[str, list]) -> None:
    entry = model.metadata_props.add()
    entry.key, entry.value = WEIGHT_MAP_KEY, json.dumps(weight_map, sort_keys=True, separators=(",", ":"))


def read_weight_map(path) -> dict[str, tuple[str, bool]]:
    """The map recorded in the graph at `path` ({} for graphs exported before it existed)."""
    from export.graph_stamp import read_metadata_entry
    from export.manifest import ArtifactError

    text = read_metadata_entry(path, WEIGHT_MAP_KEY)
    if text is None:
        return {}
    try:
        data = json.loads(text)
        return {str(key): (str(name), bool(transposed)) for key, (name, transposed) in data.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise ArtifactError(f"{path}: its weight map ({WEIGHT_MAP_KEY}) is malformed ({err})") from None
