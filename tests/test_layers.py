"""Imports only go down: scripts -> method and job folders -> common/'s folders in the order
below. A method folder that imports another (mocov3/ from moco/ for the EMA update), or
common/ that imports a job folder (export/), makes the next method copy or drag in a whole
folder; a loop between two common/ folders means neither can be read or tested alone. The
files are parsed (ast), not imported, so a lazy import inside a function counts too."""
import ast
import os
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# common/'s units, lowest first: a module imports its own unit and the ones before it. A unit
# is a folder (common/files/) or a module directly in common/ (common/errors.py).
COMMON_ORDER = [
    "common",  # the package's __init__ (a docstring)
    "common.errors",  # UserError: the one-sentence error every layer raises
    "common.extras",  # optional packages
    "common.files",  # atomic writes, the output folder's run lock: under ckpt, log and distributed
    "common.distributed",  # processes, collectives, the launcher
    "common.data",  # datasets, images, loaders
    "common.augment",  # view recipes, eval transforms, --gpu-augment
    "common.nets",  # backbones, BatchNorm, precision, the EMA update
    "common.log",  # progress line, metrics.jsonl, plots
    "common.ckpt",  # checkpoint contract, resume, pretrained weights
    "common.cli",  # the shared flag groups
    "common.watch",  # what tells a run is going wrong
    "common.eval",  # features, kNN, probes, monitors
    "common.train",  # the pretraining run: data, step loop, run state, schedules, optimizers
]
# one layer above common/; none imports another (each is one method's or one job's parts)
METHOD_AND_JOB_FOLDERS = ["moco", "mocov3", "simclr", "byol", "dino", "distill", "inpaint", "lincls", "knn", "curate", "export"]
# above them the scripts: every .py file at the repository's top (main_*.py, hubconf.py,
# export_backbone.py, plot_run.py); none imports another. On top the tools, which may import anything.
TOOLS = ["bench", "tools", "tests"]
SKIP = {".venv", ".git", "runs", "__pycache__"}  # not the repository's code

# (importer, imported) -> why it is allowed. Keep this short: every entry is a place where
# the next method has to know the exception.
EXCEPTIONS: Dict[Tuple[str, str], str] = {}

SCRIPT, TOOL = 1000, 2000  # ranks above the method and job folders' (len(COMMON_ORDER))


def module_files(root: str) -> Iterator[Tuple[str, str]]:
    """(dotted module name, path) of every .py file under `root`."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                yield ".".join(parts), path


def imported(tree: ast.AST, module: str, is_package: bool, known: set) -> Iterator[Tuple[str, int]]:
    """(module, line) of every import of a module in `known` (the repository's own), with
    `from package import module` resolved to the module and relative imports made absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def unit_of(module: str) -> Optional[Tuple[int, str]]:
    """(rank, unit) of a module of this repository; None for one this test does not place."""
    parts = module.split(".")
    top = parts[0]
    if top == "common":
        unit = ".".join(parts[:2])
        return (COMMON_ORDER.index(unit), unit) if unit in COMMON_ORDER else None
    if top in METHOD_AND_JOB_FOLDERS:
        return len(COMMON_ORDER), top
    if top in TOOLS:
        return TOOL, top
    if len(parts) == 1 and os.path.isfile(os.path.join(ROOT, top + ".py")):
        return SCRIPT, top
    return None


def violations(graph: Dict[str, List[Tuple[str, int]]], exceptions: Dict[Tuple[str, str], str]) -> List[str]:
    """One line per import that goes up or sideways, or whose module has no layer;
    `graph`: importer -> [(imported, line)], repository modules only."""
    problems = []
    for importer, targets in sorted(graph.items()):
        placed = unit_of(importer)
        if placed is None:
            problems.append(f"{importer}: not in any layer; add its folder to COMMON_ORDER, METHOD_AND_JOB_FOLDERS "
                            f"or TOOLS in tests/test_layers.py")
            continue
        rank, unit = placed
        if rank == TOOL:
            continue  # bench/, docs/, tests/ may import anything
        for target, line in targets:
            other = unit_of(target)
            if other is None:
                problems.append(f"{importer}:{line} imports {target}, which is in no layer")
                continue
            if other[1] == unit or other[0] < rank or (importer, target) in exceptions:
                continue
            where = "up" if other[0] > rank else "sideways"
            problems.append(f"{importer}:{line} imports {target} ({where}: {unit} -> {other[1]}); move the shared "
                            f"part down, or declare it in EXCEPTIONS with a reason")
    return problems


def import_graph(root: str) -> Dict[str, List[Tuple[str, int]]]:
    """importer -> sorted [(imported, line)] over every module under `root`, its own imports only."""
    files = dict(module_files(root))
    known = set(files)
    tops = {k.split(".")[0] for k in known}
    graph = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = os.path.basename(path) == "__init__.py"
        graph[module] = sorted({(t, line) for t, line in imported(tree, module, is_package, known)
                                if t.split(".")[0] in tops})
    return graph


def test_imports_only_go_down():
    graph = import_graph(ROOT)
    assert "main_moco" in graph and "common.train.run" in graph  # the walk found the tree
    problems = violations(graph, EXCEPTIONS)
    assert not problems, "imports that do not go down:\n" + "\n".join(problems)


def test_every_declared_exception_is_still_needed():
    graph = import_graph(ROOT)
    used = {(importer, t) for importer, targets in graph.items() for t, _ in targets}
    stale = [f"{a} -> {b}" for a, b in EXCEPTIONS if (a, b) not in used]
    assert not stale, "declared exceptions no import needs any more (remove them): " + ", ".join(stale)


@pytest.mark.parametrize("importer, target, expected", [
    ("common.log.progress", "common.ckpt.io", "up: common.log -> common.ckpt"),
    ("common.train.run", "export.backbone", "up: common.train -> export"),
    ("mocov3.builder", "moco.builder", "sideways: mocov3 -> moco"),
    ("main_moco_v3", "main_moco", "sideways: main_moco_v3 -> main_moco"),
    ("common.eval.features", "bench.util", "up: common.eval -> bench"),
])
def test_an_upward_or_sideways_import_is_reported(importer, target, expected):
    """The check itself can fail: a planted import in each direction it forbids is named."""
    problems = violations({importer: [(target, 7)]}, {})
    assert len(problems) == 1 and f"{importer}:7 imports {target} ({expected}" in problems[0]
    assert violations({importer: [(target, 7)]}, {(importer, target): "a reason"}) == []  # unless declared


def test_downward_imports_and_unplaced_modules():
    assert violations({"main_moco": [("moco.builder", 1), ("common.train.run", 2)],
                       "moco.builder": [("common.nets.ema", 3), ("moco.split_bn", 4)],
                       "common.ckpt.io": [("common.files.atomic", 5), ("common.errors", 6)],
                       "tests.test_x": [("main_moco", 7)]}, {}) == []
    assert "not in any layer" in violations({"newfolder.thing": [("common.errors", 1)]}, {})[0]


def test_relative_and_from_package_imports_resolve_to_modules():
    tree = ast.parse("from . import atomic\nfrom .lock import release\nfrom common.files import lock\n"
                     "import common.errors\n")
    known = {"common.files.atomic", "common.files.lock", "common.files", "common.errors"}
    assert [t for t, _ in imported(tree, "common.files.x", False, known)] == [
        "common.files.atomic", "common.files.lock", "common.files.lock", "common.errors"]
