"""The import graph of runtime/, kernels/ and export/ runs one way (DESIGN.md, "Layout"): no cycles, and
none of the forbidden arrows below. Function-local imports count: hiding an arrow in a function body
does not make it go away."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "kernels", "export")

# (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = [
    ("kernels", "runtime", "kernels are standalone ops: they know nothing of the runtime"),
    ("kernels", "export", "kernels are standalone ops: they know nothing of export"),
    ("export", "runtime.backends", "deployed backends import export, never the other way"),
    ("export", "runtime.pipeline", "export works on networks, not on the pipeline"),
    ("runtime.models", "runtime.backends", "models never know which backend runs them"),
    ("runtime.models", "export", "models never know how they are deployed"),
    ("runtime.models", "runtime.pipeline", "models sit below the pipeline"),
    ("runtime.bench", "runtime.serve", "the benchmark measures the library, not the server"),
    ("runtime.models", "runtime.serve", "models sit below the server"),
    ("runtime.pipeline", "runtime.serve", "the server calls the pipeline, never the other way"),
    ("runtime.backends", "runtime.serve", "backends run networks; serving sits above them"),
    ("runtime.serve", "runtime.backends", "the server reaches backends only through runtime.load"),
    ("runtime.serve", "export", "the server serves loaded pipelines; it does not export"),
    ("export", "runtime.serve", "export writes artifacts; it does not serve them"),
]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(path, root): path for package in PACKAGES for path in (root / package).rglob("*.py")}


def _resolve(name: str, modules) -> str | None:
    """The project module `name` refers to: itself, or its nearest enclosing module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its body."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module
                candidates = [f"{stem}.{alias.name}" if stem else alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                target = _resolve(candidate, modules)
                if target is not None and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _package_parents(module: str) -> set[str]:
    """A module's enclosing packages: importing it runs their __init__, so those arrows are implicit."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _component(module: str) -> str:
    """The folder-level unit an arrow is judged at: runtime.backends, runtime.models, export, kernels, ...;
    a file at runtime/'s top level is its own unit."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "runtime" else parts[0]


def _forbidden_arrows(graph, importer, imported) -> list[str]:
    return [
        f"{source} -> {target}"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if _within(source, importer) and _within(target, imported)
    ]


def test_no_module_imports_itself_back():
    graph = import_graph()
    # An __init__ that re-exports its submodules points down at them, and they sit inside it: that
    # containment is not a cycle.
    graph = {name: {t for t in targets if t not in _package_parents(name)} for name, targets in graph.items()}
    assert _cycles(graph) == []


def test_no_folder_imports_itself_back():
    """export/ and runtime/backends/ importing each other through different files is a cycle too."""
    folders = {}
    for source, targets in import_graph().items():
        folders.setdefault(_component(source), set()).update(
            _component(t) for t in targets if _component(t) != _component(source) and t != "runtime"
        )
    assert _cycles(folders) == []


@pytest.mark.parametrize("importer, imported, why", FORBIDDEN)
def test_no_forbidden_arrow(importer, imported, why):
    assert _forbidden_arrows(import_graph(), importer, imported) == [], why


def test_the_guard_sees_an_import_hidden_in_a_function(tmp_path):
    """A forbidden arrow put back inside a function body, in a copy of the layout, is found."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "runtime" / "models").mkdir(parents=True)
    for init in ("kernels", "runtime", "runtime/models"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "runtime" / "models" / "unet.py").write_text("from . import layers\nimport kernels.op\n")
    (tmp_path / "runtime" / "models" / "layers.py").write_text("def build():\n    from .unet import UNet\n")
    (tmp_path / "kernels" / "op.py").write_text("def launch():\n    from runtime.models import unet\n")
    (tmp_path / "export").mkdir()
    graph = import_graph(tmp_path)
    assert _forbidden_arrows(graph, "kernels", "runtime") == ["kernels.op -> runtime.models.unet"]
    assert graph["runtime.models.unet"] == {"runtime.models.layers", "kernels.op"}
    assert _cycles(graph) == [["kernels.op", "runtime.models.layers", "runtime.models.unet"]]
