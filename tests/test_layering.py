"""The import layering of rcar_fast: data flows one way, and no module reaches up.

Every module of rcar_fast (and kernels/, importable as rcar_fast.kernels) is parsed with
``ast`` (nothing is imported) and each of its imports, at module level or inside a
function, is resolved to the rcar_fast module it loads. ``LAYERS`` lists the layers from the
bottom up; a module may import modules of its own layer or of layers below it, never above.
That gives, among others:

* nothing below the package top imports ``rcar_fast`` itself (``from rcar_fast import
  scan_similarity``): names come from the module that defines them;
* rcar_fast.contract (the contract's constants) is the bottom layer and imports nothing;
* kernels/ (the Triton jit kernels) import nothing of rcar_fast but themselves and the
  contract, in particular never ``rcar_fast.ops`` or ``rcar_fast.dispatch``;
* the evaluation package never imports cli, train or checkpoint, and inside it the parts
  (adapters, inputs, distributed, protocols, results) sit below the tile loop (streaming),
  which sits below the entry points (matrix, topk);
* ``bench`` (outside the package) is imported only by cli, and only inside a function (the
  ``rcar-fast bench`` subcommand), so importing rcar_fast never loads the benchmarks;
* no import cycle at all (dispatch imports the op modules, never the reverse).

A new module must be placed in ``LAYERS`` (the test names it otherwise).

The op modules (rcar_fast/ops/<op>.py: an op family's custom ops, backend classes, public
wrapper and Scorer) sit on the op machinery (ops/backend.py, ops/library.py, ops/scorer.py),
which never imports an op module; above them the models (RCARSimilarity) and the head registry
(scorers), and above those dispatch, which assembles the op modules' BACKENDS (gram's, and
every registered head's through its Scorer) into its TABLE: an op module chooses among its own
backends (ops.backend.choose) and nothing below dispatch imports it, not even inside a
function. No cycle is allowed anywhere.

TODO:
"""
from __future__ import annotations

import ast
import functools
import os
import pathlib
from typing import Iterator, NamedTuple, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "rcar_fast"

# Bottom to top. A name stands for that module and everything under it; the longest match
# places a module. The package top itself ("rcar_fast", its __init__) is matched exactly.
LAYERS = [
    ("contract", ["rcar_fast.contract"]),
    ("kernels", ["rcar_fast.kernels", "rcar_fast._C"]),
    ("base", ["rcar_fast.atomic", "rcar_fast.validate", "rcar_fast.metrics", "rcar_fast.dropout",
              "rcar_fast.reference_math", "rcar_fast.reference_heads", "rcar_fast.checkpoint_keys",
              "rcar_fast.heads", "rcar_fast.reference", "rcar_fast.data", "rcar_fast.flops"]),
    ("op machinery", ["rcar_fast.ops.backend", "rcar_fast.ops.library", "rcar_fast.ops.scorer"]),
    ("ops", ["rcar_fast.ops"]),
    ("models", ["rcar_fast.modules", "rcar_fast.encoders"]),
    ("head registry", ["rcar_fast.scorers"]),
    ("dispatch", ["rcar_fast.dispatch"]),
    ("scoring", ["rcar_fast.pairs", "rcar_fast.losses"]),
    ("checkpoint", ["rcar_fast.checkpoint"]),
    ("evaluation parts", ["rcar_fast.evaluation.adapters", "rcar_fast.evaluation.inputs",
                          "rcar_fast.evaluation.distributed", "rcar_fast.evaluation.protocols",
                          "rcar_fast.evaluation.results"]),
    ("evaluation streaming", ["rcar_fast.evaluation.streaming"]),
    ("evaluation entry points", ["rcar_fast.evaluation.matrix", "rcar_fast.evaluation.topk"]),
    ("evaluation", ["rcar_fast.evaluation"]),
    ("attention", ["rcar_fast.attention"]),
    ("train", ["rcar_fast.train"]),
    ("cli", ["rcar_fast.cli"]),
    ("entry point", ["rcar_fast.__main__"]),
    ("package top", ["rcar_fast"]),
]
# Layers whose modules may import each other in a circle (see the TODO list).
CYCLES_ALLOWED_IN: set = set()
# Outside packages of this repository that rcar_fast may import: {name: modules allowed to,
# only inside a function}.
LAZY_ONLY = {"bench": {"rcar_fast.cli"}}
FORBIDDEN_OUTSIDE = ("tests", "examples", "scripts")


class Import(NamedTuple):
    importer: str
    target: str          # a module of this repository (rcar_fast.x.y, bench, ...)
    line: int
    lazy: bool           # inside a function


# ---------------------------------------------------------------------------------------------
# Reading the tree
# ---------------------------------------------------------------------------------------------

def source_modules(root: pathlib.Path = ROOT) -> dict:
    """{module name: path} of rcar_fast/ and kernels/ (as rcar_fast.kernels)."""
    found = {}
    for base, prefix in ((root / PACKAGE, (PACKAGE,)), (root / "kernels", (PACKAGE, "kernels"))):
        for folder, dirs, files in os.walk(base):    # symlinks (rcar_fast/kernels) not followed
            rel = pathlib.Path(folder).relative_to(base).parts
            if prefix == (PACKAGE,) and rel[:1] == ("kernels",):
                dirs.clear()
                continue
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    parts = prefix + rel + (name[:-3],)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    found[".".join(parts)] = pathlib.Path(folder) / name
    return found


def _is_package(module: str, modules: dict) -> bool:
    return modules.get(module, pathlib.Path()).name == "__init__.py"


def _resolve_relative(importer: str, level: int, module: Optional[str], modules: dict) -> str:
    parts = importer.split(".")
    if not _is_package(importer, modules):
        parts = parts[:-1]                       # a module's package
    parts = parts[:len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(parts + ([module] if module else []))


def _ours(name: str) -> bool:
    return name.split(".")[0] in (PACKAGE, "kernels", *LAZY_ONLY, *FORBIDDEN_OUTSIDE)


@functools.lru_cache(maxsize=None)
def _raw_imports(source: str) -> tuple:
    """(level, from-module or None, imported names, line, inside a function) per import."""
    tree = ast.parse(source)
    lazy_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy_nodes.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.append((0, None, tuple(a.name for a in node.names), node.lineno, id(node) in lazy_nodes))
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, tuple(a.name for a in node.names), node.lineno,
                          id(node) in lazy_nodes))
    return tuple(found)


def imports_of(module: str, source: str, modules: dict) -> Iterator[Import]:
    """Every import of this repository's modules in ``source``, resolved: ``from pkg import
    name`` targets pkg.name when that is a module, else pkg (the name comes from its
    __init__)."""
    for level, from_module, names, line, lazy in _raw_imports(source):
        if from_module is None and not level:          # import a.b, c
            yield from (Import(module, name, line, lazy) for name in names if _ours(name))
            continue
        base = _resolve_relative(module, level, from_module, modules) if level else from_module
        if not _ours(base):
            continue
        for name in names:
            candidate = f"{base}.{name}"
            yield Import(module, candidate if candidate in modules else base, line, lazy)


def layer_of(module: str) -> Optional[int]:
    """Index in LAYERS of the longest name matching ``module``; None if unplaced."""
    best, best_len = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            exact_only = name == PACKAGE
            if module == name or (not exact_only and module.startswith(name + ".")):
                if len(name) > best_len:
                    best, best_len = index, len(name)
    return best


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------

def violations(modules: dict, sources: dict) -> list:
    """One line per broken rule over {module: source}."""
    problems = []
    edges = []
    for module in sorted(sources):
        here = layer_of(module)
        if here is None:
            problems.append(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
            continue
        for imp in imports_of(module, sources[module], modules):
            top = imp.target.split(".")[0]
            where = f"{module}:{imp.line} imports {imp.target}"
            if top in LAZY_ONLY:
                if module not in LAZY_ONLY[top]:
                    problems.append(f"{where}: only {sorted(LAZY_ONLY[top])} may import {top}")
                elif not imp.lazy:
                    problems.append(f"{where} at module level: import it inside the function "
                                    f"that needs it (importing {PACKAGE} must not load {top})")
                continue
            if top in FORBIDDEN_OUTSIDE:
                problems.append(f"{where}: the package must not depend on {top}/")
                continue
            target = PACKAGE + imp.target[len("kernels"):] if top == "kernels" else imp.target
            there = layer_of(target)
            if there is None:
                problems.append(f"{where}, a module in no layer (add it to LAYERS)")
                continue
            if there > here:
                problems.append(f"{where}: layer '{LAYERS[here][0]}' reaches up to layer "
                                f"'{LAYERS[there][0]}'")
            if target != module:
                edges.append((module, target))
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return problems


def _cycles(edges) -> list:
    """Cycles of the import graph, leaving out edges inside a layer of CYCLES_ALLOWED_IN."""
    graph = {}
    for a, b in edges:
        same = layer_of(a) == layer_of(b)
        if not (same and LAYERS[layer_of(a)][0] in CYCLES_ALLOWED_IN):
            graph.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


@functools.lru_cache(maxsize=1)
def _read_tree() -> tuple:
    modules = source_modules()
    return modules, {name: path.read_text() for name, path in modules.items()}


def _tree_sources() -> tuple:
    """({module: path}, {module: source}) of this checkout (copies: callers may edit them)."""
    modules, sources = _read_tree()
    return dict(modules), dict(sources)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_the_tree_follows_the_layers():
    modules, sources = _tree_sources()
    assert "rcar_fast.evaluation.matrix" in modules and "rcar_fast.kernels.scan" in modules
    problems = violations(modules, sources)
    assert not problems, "\n".join(problems)


def test_every_import_is_seen():
    # The checker must see the imports it judges: a few that are known to be in the tree.
    modules, sources = _tree_sources()
    seen = {(i.importer, i.target, i.lazy) for name in sources
            for i in imports_of(name, sources[name], modules)}
    assert ("rcar_fast.kernels.scan", "rcar_fast.kernels.gram", False) in seen   # from . import gram
    assert ("rcar_fast.cli", "bench.__main__", True) in seen
    assert ("rcar_fast.evaluation.matrix", "rcar_fast.evaluation.distributed", False) in seen
    assert ("rcar_fast", "rcar_fast.ops.scan", False) in seen
    assert ("rcar_fast.dispatch", "rcar_fast.scorers", False) in seen


def _with(module: str, source: str) -> list:
    """The violations of the tree with ``module``'s source replaced (or added)."""
    modules, sources = _tree_sources()
    path = ROOT / (module.replace(".", "/") + ".py")
    modules.setdefault(module, path)
    return violations(modules, {**sources, module: source})


def _added_line(module: str, line: str) -> list:
    modules, sources = _tree_sources()
    return _with(module, sources.get(module, "") + "\n" + line + "\n")


@pytest.mark.parametrize("module,line,expected", [
    ("rcar_fast.evaluation.adapters", "from rcar_fast import scan_similarity",
     "reaches up to layer 'package top'"),
    ("rcar_fast.ops.scan", "import rcar_fast", "reaches up to layer 'package top'"),
    ("rcar_fast.evaluation.topk", "def f():\n    from rcar_fast import cli",
     "reaches up to layer 'cli'"),
    ("rcar_fast.evaluation.adapters", "from rcar_fast.evaluation.matrix import all_pairs",
     "reaches up to layer 'evaluation entry points'"),
    ("rcar_fast.kernels.scan", "from rcar_fast.ops import scan", "reaches up to layer 'ops'"),
    ("rcar_fast.kernels.rcar", "def f():\n    from rcar_fast.dispatch import choose",
     "reaches up to layer \'dispatch\'"),
    ("rcar_fast.ops.scan", "from rcar_fast import dispatch", "reaches up to layer 'dispatch'"),
    ("rcar_fast.ops.maxsim", "def f():\n    from rcar_fast.dispatch import choose",
     "reaches up to layer 'dispatch'"),
    ("rcar_fast.ops.library", "from rcar_fast.ops import rcar", "reaches up to layer 'ops'"),
    ("rcar_fast.ops.backend", "from rcar_fast.ops.scan import ScanCpu", "reaches up to layer 'ops'"),
    ("rcar_fast.ops.gram", "from rcar_fast.modules import RCARSimilarity", "reaches up to layer 'models'"),
    ("rcar_fast.modules", "from rcar_fast import dispatch", "reaches up to layer 'dispatch'"),
    ("rcar_fast.scorers", "def f():\n    from rcar_fast.dispatch import TABLE", "reaches up to layer 'dispatch'"),
    ("rcar_fast.cli", "import bench.__main__", "at module level"),
    ("rcar_fast.train", "def f():\n    import bench", "only ['rcar_fast.cli'] may import bench"),
    ("rcar_fast.metrics", "from tests import tolerances", "must not depend on tests/"),
    ("rcar_fast.atomic", "from rcar_fast import data", "import cycle"),   # data imports atomic
])
def test_the_checker_catches_a_broken_rule(module, line, expected):
    problems = _added_line(module, line)
    assert any(expected in p for p in problems), problems


def test_dispatch_assembles_every_op_module():
    # Every module of rcar_fast/ops that lists backends (BACKENDS) reaches dispatch.TABLE by a
    # name a reader finds: gram imported by dispatch, the heads' through scorers.SCORERS (their
    # Scorer's `backends`); no registration by import side effect.
    import importlib

    from rcar_fast import dispatch, scorers

    modules, sources = _tree_sources()
    with_backends = {name for name, source in sources.items() if name.startswith("rcar_fast.ops.")
                     and any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BACKENDS"
                                                                   for t in node.targets)
                             for node in ast.parse(source).body)}
    assert with_backends == {"rcar_fast.ops.gram", "rcar_fast.ops.scan", "rcar_fast.ops.rcar",
                             "rcar_fast.ops.maxsim"}
    families = {id(family) for family in dispatch.OP_FAMILIES}
    for name in with_backends:
        assert id(importlib.import_module(name).BACKENDS) in families, f"{name}.BACKENDS is not in dispatch.TABLE"
    assert {id(s.backends) for s in scorers.SCORERS} <= families


def test_an_unplaced_module_is_named():
    problems = _with("rcar_fast.unplaced_probe", "X = 1\n")
    assert any("rcar_fast.unplaced_probe is in no layer" in p for p in problems), problems


def test_a_submodule_import_is_not_an_import_of_the_top():
    # `from rcar_fast import data` loads the module rcar_fast.data, not a name of __init__.
    assert not _added_line("rcar_fast.checkpoint", "from rcar_fast import data, metrics")


def test_setup_ships_every_package():
    # setup.py lists its packages by name: a new package folder must be added there, or an
    # installed rcar_fast would lack it.
    setup = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(kw.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "packages")
    packages = {name for name, path in source_modules().items() if path.name == "__init__.py"}
    assert packages == set(listed), f"setup.py packages={sorted(listed)}, the tree has {sorted(packages)}"
