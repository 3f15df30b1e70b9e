"""The one result-file layout of every benchmark (runtime.bench and benchmarks/*):

    {"schema": SCHEMA, "benchmark": name, "provenance": {device, versions, git, utc}, "config": {...},
     "rows": [...], **extra}

Written whole after every row (to a temporary file, then renamed), so that a run cut short keeps what it
measured and no reader ever sees a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

from runtime.bench.provenance import provenance

SCHEMA = "sd-runtime.bench/1"


def finite_or_text(value):
    """Strict JSON has no Infinity / NaN: such floats are written as the strings "inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(v) for v in value]
    return value


def write_result(
    path: str | os.PathLike, benchmark: str, config: dict, rows: list[dict], stamp: dict | None = None, **extra
) -> pathlib.Path:
    """Write the result file (parents created); `stamp` defaults to a fresh provenance()."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "provenance": stamp or provenance(),
        "config": config,
        "rows": rows,
        **extra,
    }
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(finite_or_text(payload), indent=2) + "\n")
    os.replace(partial, path)
    return path
