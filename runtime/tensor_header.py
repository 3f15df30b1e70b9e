"""The header of a .safetensors file, read and checked without mapping the file.

Layout: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the data. Reading this first lets the
loader check every name, shape and dtype against the model before any tensor data is mapped (a 40 GB
file of the wrong model is refused in milliseconds), and lets a truncated file be named as such
instead of surfacing as an mmap or deserialisation error.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# bytes per element of each safetensors dtype name; FLOAT_DTYPES are the ones weights may have.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a .safetensors file; ValueError naming the file and the problem."""
    path = Path(path)
    bad = f"{path}: not a readable .safetensors file (truncated or corrupt?)"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"{bad}: header length {length} does not fit in the file's {size} bytes")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{bad}: header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: header is not a JSON object")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{bad}: entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"{bad}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{bad}: tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{bad}: tensor {name!r} has data_offsets {offsets!r}")
        if offsets[1] > data_size:
            raise ValueError(
                f"{bad}: tensor {name!r} ends at byte {offsets[1]} of the data, but the file "
                f"holds only {data_size} bytes of data"
            )
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise ValueError(
                f"{bad}: tensor {name!r} ({dtype} {shape}) does not match its {offsets[1] - offsets[0]} bytes"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape))
    return tensors
