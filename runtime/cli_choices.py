"""The names the command line offers (backends, schedulers, dtypes, prompt syntaxes), read from the tables
that define them without importing their modules: those import torch, which takes seconds, and
`python -m runtime --help` must answer at once. Each table stays the one place its names are written;
tests/test_cli.py checks that what is read here equals the imported tables.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path


@functools.cache
def table_names(module: str, table: str) -> tuple[str, ...]:
    """The string keys (dict) or items (tuple/list) of the literal `table` assigned at the top of `module`."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"module {module} not found")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(target, ast.Name) and target.id == table for target in targets):
            value = node.value
            keys = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", None)
            if keys is None:
                break
            return tuple(ast.literal_eval(key) for key in keys)
    raise LookupError(f"{module}.{table} is not a literal dict or tuple of names at the module's top level")


def backends() -> tuple[str, ...]:
    return table_names("runtime.backends", "BACKENDS")


def exported_backends() -> tuple[str, ...]:
    return table_names("runtime.backends", "EXPORTED")


def schedulers() -> tuple[str, ...]:
    return table_names("runtime.schedulers", "_BY_NAME")  # SCHEDULER_NAMES is its keys


def dtypes() -> tuple[str, ...]:
    return table_names("runtime.dtypes", "PRECISIONS")


def prompt_syntaxes() -> tuple[str, ...]:
    return table_names("runtime.prompt_syntax", "PROMPT_SYNTAXES")
