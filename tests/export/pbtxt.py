"""A reader of protobuf text format (what Triton's config.pbtxt is), and the subset of Triton's
ModelConfig schema our repository uses: unknown fields or wrongly typed values fail the test, as
Triton would refuse the file."""

from __future__ import annotations

import re

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?)*\s*("(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+)')


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unreadable text at {position}: {text[position : position + 20]!r}")
        tokens.append(match.group(1))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return tokens


def _scalar(token: str):
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?", token):
        return float(token)
    if token in ("true", "false"):
        return token == "true"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
        return ("enum", token)
    raise ValueError(f"not a value: {token!r}")


def parse(text: str) -> dict:
    """{field: value or list of values} (a repeated field is always a list)."""
    tokens = _tokens(text)
    message, end = _message(tokens, 0, closing=None)
    assert end == len(tokens)
    return message


def _message(tokens, i, closing):
    fields: dict = {}
    while i < len(tokens) and tokens[i] != closing:
        name = tokens[i]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"expected a field name, got {name!r}")
        i += 1
        if tokens[i] == ":":
            i += 1
        values, i = _value(tokens, i)
        fields.setdefault(name, []).extend(values)
        if i < len(tokens) and tokens[i] in (",", ";"):
            i += 1
    if closing is not None:
        if i >= len(tokens):
            raise ValueError(f"missing {closing!r}")
        i += 1
    return fields, i


def _value(tokens, i):
    if tokens[i] == "{":
        message, i = _message(tokens, i + 1, "}")
        return [message], i
    if tokens[i] == "[":
        values, i = [], i + 1
        while tokens[i] != "]":
            more, i = _value(tokens, i)
            values.extend(more)
            if tokens[i] == ",":
                i += 1
        return values, i + 1
    return [_scalar(tokens[i])], i + 1


# Triton's ModelConfig (model_config.proto), the fields used here: scalar kinds and nested messages.
_DATA_TYPES = {"TYPE_BOOL", "TYPE_UINT8", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_STRING"}
_TENSOR = {"name": str, "data_type": _DATA_TYPES, "dims": int, "optional": bool}
SCHEMA = {
    "name": str,
    "backend": str,
    "platform": str,
    "max_batch_size": int,
    "default_model_filename": str,
    "input": _TENSOR,
    "output": _TENSOR,
    "instance_group": {"kind": {"KIND_GPU", "KIND_CPU"}, "count": int, "gpus": int},
    "parameters": {"key": str, "value": {"string_value": str}},
}
_SINGULAR = {
    "name",
    "backend",
    "platform",
    "max_batch_size",
    "default_model_filename",
    "data_type",
    "optional",
    "kind",
    "count",
    "key",
    "value",
    "string_value",
}


def check(message: dict, schema: dict = SCHEMA, where: str = "config") -> None:
    for name, values in message.items():
        if name not in schema:
            raise ValueError(f"{where}: unknown field {name!r}")
        if name in _SINGULAR and len(values) != 1:
            raise ValueError(f"{where}: {name} given {len(values)} times")
        kind = schema[name]
        for value in values:
            if isinstance(kind, dict):
                if not isinstance(value, dict):
                    raise ValueError(f"{where}.{name}: expected a message")
                check(value, kind, f"{where}.{name}")
            elif isinstance(kind, set):
                if not (isinstance(value, tuple) and value[1] in kind):
                    raise ValueError(f"{where}.{name}: {value!r} is not one of {sorted(kind)}")
            elif type(value) is not kind:
                raise ValueError(f"{where}.{name}: {value!r} is not a {kind.__name__}")


def plain(message: dict) -> dict:
    """Singular fields unwrapped, enums as their names: easier to read in asserts."""
    out = {}
    for name, values in message.items():
        values = [plain(v) if isinstance(v, dict) else v[1] if isinstance(v, tuple) else v for v in values]
        out[name] = values[0] if name in _SINGULAR else values
    return out
