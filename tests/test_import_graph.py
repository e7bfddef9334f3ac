"""Imports run one way: no import cycle between modules, none between layers, and every module imports alone.

The graph is read from the source (``ast``), counting imports inside functions too: a function-level import
that hides a cycle is still a cycle. Layers, lowest first (DESIGN.md §3):

    leaves (errors, io, config, digest, progress, commands, checks, predictions, stats, ...) → data → models
    → inference, device → run_dir → training → evaluation → explain, audit → reports → demo, datasets → cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "medtransfer"

#: Layer of each top-level module or sub-package; an import may only point to the same or a lower layer.
LAYERS = {
    "_version": 0, "_optional": 0, "errors": 0, "io": 0, "faults": 0, "digest": 0, "progress": 0, "diagnostics": 0,
    "cpu": 0, "distributed": 0, "_callable": 0,
    "config": 1, "commands": 1, "format": 0, "predictions": 1, "stats": 1, "checks": 2,
    "data": 3, "models": 4, "device": 4, "inference": 5, "run_dir": 6, "training": 7, "evaluation": 8,
    "explain": 9, "audit": 9, "reports": 10, "datasets": 11, "demo": 11, "deploy": 11, "adapt": 9, "cli": 12, "__init__": 13, "__main__": 13,
    # leaves inside a layer: the preprocessing description and task names (pydantic only), used by config
    "data.spec": 0,
    # predict(dicom_out=...) files DICOM results with deploy.dicom: an entry point above deploy (cli, __init__ use it)
    "evaluation.predict": 11,
    # self-supervised pretraining trains (above training); its weights-source reader is a leaf training reads
    "pretrain": 8, "pretrain.source": 0,
}


def _layer(module: str) -> int:
    """The layer of ``medtransfer.<a>.<b>...``: the most specific entry of LAYERS that names it."""
    parts = module.split(".")[1:] or ["__init__"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("medtransfer"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.startswith("medtransfer"):
                subs = [f"{mod}.{a.name}" for a in node.names]
                modules = [s for s in subs if s in known]
                # ``from pkg import module``: the module is the dependency, not the package's __init__
                out.update(modules if len(modules) == len(subs) else [mod, *modules])
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        if name == "medtransfer":
            continue  # the package's lazy public API (PEP 562) names everything on purpose
        targets = {t for t in _imports(path, name, set(files)) if t in files and t != name and t != "medtransfer"}
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle_between_modules_even_inside_functions() -> None:
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers() -> None:
    graph = _graph()
    unknown = sorted({_top(m) for m in graph} - set(LAYERS))
    assert not unknown, f"add {unknown} to LAYERS (and DESIGN.md's layer list)"
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if _layer(b) > _layer(a)]
    assert upward == [], upward


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
def test_every_module_imports_in_any_order(order: str) -> None:
    """Each order in a fresh interpreter, so that no earlier import hides an order dependency."""
    import random

    modules = sorted(m for m in _graph() if m.count(".") >= 1)
    if order == "reversed":
        modules.reverse()
    elif order == "shuffled":
        random.Random(0).shuffle(modules)
    code = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
