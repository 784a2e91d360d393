"""The package's layers: every import of every module points down the stack, and no folders form a cycle.

Layers, lowest first (a module may import its own folder and any folder of a lower rank):

    utils.core   errors, paths, devices, drawing: no project imports
    utils.ops    boxes, IoU, decode, NMS: tensor math
    models       registry, blocks, parser, Model, checkpoints (imports at most ops and core)
    utils.data   data YAML, labels, dataset, loader (never models: data does not know the network)
    utils.accel  optional CPU kernels and `accelerate()`
    utils.export exporters, graph passes, the metadata schema
    utils.infer  backends, sources, writers, runtime policy
    utils.eval   evaluator, metrics, COCO, plots
    utils.train  loss, optimizer, EMA, AutoAnchor, config, setup
    scripts      train.py, val.py, detect.py, export.py, benchmarks/

Imports inside a function count like any other, and in the package and the four scripts a function
imports only third-party packages (to keep a heavy optional one such as onnx, onnxruntime or matplotlib
off the import path), never a project module. benchmarks/ may: they set the environment (OpenMP wait
policy, allocator) before torch loads.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANKS = {"utils.core": 0, "utils.ops": 1, "models": 2, "utils.data": 2, "utils.accel": 3, "utils.export": 4,
         "utils.infer": 5, "utils.eval": 6, "utils.train": 7, "scripts": 8}
SCRIPTS = ("train", "val", "detect", "export", "hubconf", "benchmarks")
# Folders of equal rank that must not import each other.
APART = {frozenset({"models", "utils.data"})}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to, None for third-party and the standard library."""
    if module.split(".")[0] in SCRIPTS:
        return "scripts"
    for name in sorted(RANKS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    if module == "utils" or module.startswith("utils."):
        return "utils"  # a flat module directly under utils/: not allowed, see test_utils_has_only_folders
    return None


def project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("*.py"), *ROOT.glob("models/**/*.py"), *ROOT.glob("utils/**/*.py"),
             *ROOT.glob("benchmarks/**/*.py")]
    out = {}
    for f in files:
        rel = f.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            out[".".join(parts)] = f
    return out


def imports_of(module: str, file: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in `file`, relative ones resolved."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    pkg = module.split(".")[:-1] if file.name != "__init__.py" else module.split(".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # `from utils import data`
    return out


def layer_edges() -> list[tuple[str, str, str, int]]:
    """(from layer, to layer, file, line) for every import between two different project layers."""
    mods = project_modules()
    edges = []
    for mod, file in mods.items():
        src = layer_of(mod)
        for target, line in imports_of(mod, file):
            dst = layer_of(target)
            if dst is not None and dst != src and (target in mods or dst != "utils"):
                edges.append((src, dst, str(file.relative_to(ROOT)), line))
    return edges


def bad_edges(edges: list[tuple[str, str, str, int]]) -> list[str]:
    bad = []
    for src, dst, file, line in edges:
        if src == "utils" or dst == "utils":
            bad.append(f"{file}:{line}: flat utils module ({src} -> {dst})")
        elif RANKS[dst] > RANKS[src] or (RANKS[dst] == RANKS[src]) or frozenset({src, dst}) in APART:
            bad.append(f"{file}:{line}: {src} imports {dst} (back edge)")
    return bad


def find_cycle(edges: list[tuple[str, str, str, int]]) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for src, dst, *_ in edges:
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cyc := visit(nxt, path + [node])):
                return cyc
        state[node] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cyc := visit(n, [])):
            return cyc
    return None


def local_project_imports(file: Path, name: str | None = None) -> list[str]:
    """`name:line: module` (name: the file's path by default) for each project import inside a function body."""
    out = []
    for fn in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                names = ([a.name for a in n.names] if isinstance(n, ast.Import)
                         else [n.module or "."] if isinstance(n, ast.ImportFrom) else [])
                out += [f"{name or file.as_posix()}:{n.lineno}: {m}" for m in names
                        if (isinstance(n, ast.ImportFrom) and n.level) or layer_of(m) is not None]
    return out


def test_functions_import_no_project_module():
    files = [f.relative_to(ROOT) for m, f in project_modules().items() if not m.startswith("benchmarks")]
    assert [hit for f in files for hit in local_project_imports(ROOT / f, f.as_posix())] == []


def test_the_local_import_check_sees_one(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("import json\n\ndef g():\n    import onnx\n    from utils.ops import boxes\n    from . import x\n")
    assert local_project_imports(f) == [f"{f.as_posix()}:5: utils.ops", f"{f.as_posix()}:6: ."]


def test_every_import_points_down_the_layers():
    edges = layer_edges()
    assert edges, "no project imports found: the walk is broken"
    assert bad_edges(edges) == []


def test_no_cycle_between_folders():
    assert find_cycle(layer_edges()) is None


def test_utils_has_only_folders():
    flat = sorted(p.name for p in (ROOT / "utils").glob("*.py") if p.name != "__init__.py")
    assert flat == []


def test_every_module_has_a_layer():
    missing = [m for m in project_modules() if layer_of(m) in (None, "utils") and m != "utils"]
    assert missing == []


@pytest.mark.parametrize("edges,expect", [
    ([("models", "utils.ops", "models/a.py", 1)], []),
    ([("utils.ops", "models", "utils/ops/a.py", 3)], ["utils/ops/a.py:3: utils.ops imports models (back edge)"]),
    ([("models", "utils.data", "models/a.py", 2)], ["models/a.py:2: models imports utils.data (back edge)"]),
    ([("utils.train", "utils", "utils/train/a.py", 5)], ["utils/train/a.py:5: flat utils module (utils.train -> utils)"]),
])
def test_the_checker_flags_back_edges(edges, expect):
    assert bad_edges(edges) == expect


def test_the_checker_finds_a_cycle():
    edges = [("a", "b", "", 0), ("b", "c", "", 0), ("c", "a", "", 0)]
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle(edges[:2]) is None


def test_relative_imports_are_resolved(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from . import boxes\nfrom ..core import paths\nimport torch\n")
    got = {t for t, _ in imports_of("utils.ops.x", f)}
    assert {"utils.ops", "utils.ops.boxes", "utils.core", "utils.core.paths", "torch"} <= got
