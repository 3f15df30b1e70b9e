"""The weights an ONNX graph was exported from, recorded inside the graph itself.

The manifest's key fields say which weights an artifact was built from, but the manifest is a JSON
file anyone who can write the export directory can edit: changing its "weights" digest to another
model's would make that model run these graphs. So the exporter also writes the digest into the
graph's own `metadata_props` (covered by the file's sha256 in the manifest), and reuse requires the
stamp, the manifest and the weights being loaded to agree. Forging it then means rewriting the graph
and its hash, which is deliberate tampering with the artifact, not an edited index.

Reading the stamp walks only the top-level fields of the ModelProto and seeks past the graph, so it
costs the same for a 2 GB UNet as for a text encoder.
"""

from __future__ import annotations

import os
from pathlib import Path

STAMP_KEY = "sd-runtime.weights_sha256"
_METADATA_FIELD = 14  # ModelProto.metadata_props (StringStringEntryProto: key = 1, value = 2)
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_MAX_ENTRY = 64 << 20  # a metadata entry larger than this is not one of ours (SDXL's weight map is ~0.3 MB)


def stamp(model, weights_digest: str) -> None:
    """Record `weights_digest` in an onnx.ModelProto (before it is saved)."""
    for entry in model.metadata_props:
        if entry.key == STAMP_KEY:
            entry.value = weights_digest
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = STAMP_KEY, weights_digest


def _varint(handle) -> int:
    value, shift = 0, 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise EOFError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _fields(data: bytes):
    """(field number, bytes) of the length-delimited fields of a small message."""
    import io

    handle = io.BytesIO(data)
    while handle.tell() < len(data):
        tag = _varint(handle)
        if tag & 7 != _LEN:
            raise ValueError("unexpected wire type in a metadata entry")
        size = _varint(handle)
        yield tag >> 3, handle.read(size)


def read_stamp(path: str | os.PathLike) -> str | None:
    """The weights digest recorded in the graph at `path`, or None if it has none."""
    return read_metadata_entry(path, STAMP_KEY)


def read_metadata_entry(path: str | os.PathLike, key: str) -> str | None:
    """The value of metadata entry `key` of the graph at `path` (None if absent), without parsing the graph."""
    path = Path(path)
    size = path.stat().st_size
    found = None
    with open(path, "rb") as handle:
        while handle.tell() < size:
            tag = _varint(handle)
            field, wire = tag >> 3, tag & 7
            if wire == _VARINT:
                _varint(handle)
            elif wire == _I64:
                handle.seek(8, os.SEEK_CUR)
            elif wire == _I32:
                handle.seek(4, os.SEEK_CUR)
            elif wire == _LEN:
                length = _varint(handle)
                if field == _METADATA_FIELD and length < _MAX_ENTRY:
                    entry = dict(_fields(handle.read(length)))
                    if entry.get(1) == key.encode():
                        found = entry.get(2, b"").decode("utf-8", "replace")
                else:
                    handle.seek(length, os.SEEK_CUR)
            else:
                raise ValueError(f"{path}: not an ONNX model (wire type {wire} at top level)")
    return found


def check_stamp(path: str | os.PathLike, weights_digest: str, manifest_path: str | os.PathLike) -> None:
    """Refuse a graph whose recorded weights are not `weights_digest` (what the manifest claims and
    what is being loaded)."""
    from export.manifest import ArtifactError

    try:
        recorded = read_stamp(path)
    except (OSError, ValueError, EOFError) as err:
        raise ArtifactError(f"{path}: cannot read the weights it was exported from ({err})") from None
    if recorded is None:
        raise ArtifactError(
            f"{path} records no weights digest ({STAMP_KEY}), yet {manifest_path} says it "
            f"is current: the manifest was edited or the graph replaced; delete the "
            f"directory and export again"
        )
    if recorded != weights_digest:
        raise ArtifactError(
            f"{path} was exported from weights {recorded[:12]}..., but {manifest_path} "
            f"claims {weights_digest[:12]}..., the weights being loaded: the manifest does "
            f"not describe this graph (edited or copied from another export); refusing to "
            f"run another model's graph. Delete the directory and export again"
        )
