"""The package's layering (docs/design.md §2), checked on the source with ``ast``: every module
of ``hmqat/**/*.py`` sits in one layer (infrastructure -> method -> study), imports only its own
or lower layers, the intra-package import graph has no cycle, and imports inside functions are
only for optional heavy dependencies."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "hmqat"

#: Layer of each module (dotted name below ``hmqat``); 0 = infrastructure, 1 = method, 2 = study.
LAYERS: dict[str, int] = {
    "runtime": 0, "locking": 0, "data": 0, "models": 0, "distributed": 0, "stats": 0,
    "quant": 1, "bn": 1, "hessian": 1, "sensitivity": 1, "search": 1, "train": 1,
    "transitions": 1, "export": 1, "onnx_export": 1,
    "study": 2, "study.pipeline": 2, "study.ablation": 2, "study.reporting": 2,
    "study.plotting": 2, "study.cli": 2, "study.runs": 2, "study.params": 2,
    "study.sensitivity_study": 2, "study.lessons": 2, "study.budget": 2, "study.summary": 2, "study.walk": 2, "study.walk_study": 2, "study.across_models": 2,
}
#: Optional heavy dependencies that may be imported inside a function (only when used).
OPTIONAL = {"pulp", "pyhessian", "onnx", "onnxruntime", "IPython",
            "fcntl",  # fcntl: absent on Windows; IPython: the notebooks extra
            "papermill", "nbclient",  # only the pipeline driver runs notebooks; every kernel
#                                       imports study.pipeline (Study) and would pay ~2 s for them
            "torchvision"}  # decoding, downloads, ImageNet and its model zoo only: ~1.5 s a kernel


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PKG.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, here: str) -> list[str]:
    """The ``hmqat`` modules an import statement in module ``here`` refers to."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("hmqat.") for a in node.names if a.name.startswith("hmqat.")]
    if node.level == 0:
        if node.module != "hmqat" and not (node.module or "").startswith("hmqat."):
            return []
        base = (node.module or "").removeprefix("hmqat").lstrip(".")
    else:
        pkg = here.split(".")[:-1] if here != "study" else ["study"]
        pkg = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        out.append(sub if sub in LAYERS else base)
    return [t for t in out if t]


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def _function_imports(tree: ast.Module) -> list[str]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    out.append("." * node.level + (node.module or ""))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in _modules().items():
        deps = set()
        for node in ast.walk(tree):   # every import, wherever it is
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(t for t in _targets(node, name) if t != name)
        graph[name] = deps
    return graph


def test_every_module_has_a_layer():
    names = set(_modules()) - {"__init__"}
    assert names == set(LAYERS), (f"give new modules a layer in tests/test_layers.py: "
                                  f"{sorted(names - set(LAYERS))}; gone: "
                                  f"{sorted(set(LAYERS) - names)}")


def test_imports_point_down_only():
    upward = [(m, t) for m, deps in _graph().items() if m != "__init__"
              for t in deps if LAYERS[t] > LAYERS[m]]
    assert upward == []


def test_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_package_root_imports_nothing():
    assert _top_level_imports(_modules()["__init__"]) == []


def test_function_level_imports_only_for_optional_dependencies():
    found = {m: [i for i in _function_imports(t) if i.split(".")[0] not in OPTIONAL]
             for m, t in _modules().items()}
    assert {m: i for m, i in found.items() if i} == {}


@pytest.mark.parametrize("source, here, expected", [
    ("from .. import quant, train", "study.cli", ["quant", "train"]),
    ("from .reporting import x", "study.pipeline", ["study.reporting"]),
    ("from .runtime import x", "train", ["runtime"]),
    ("from hmqat.study import pipeline", "quant", ["study.pipeline"]),
])
def test_import_resolution(source, here, expected):
    node = ast.parse(source).body[0]
    got = [t for t in _targets(node, here) if t in LAYERS]
    assert got == expected
