"""ppvi's import layers, read from the import statements (ast; nothing is imported).

Two rules (issue 9):

- no module imports another module's private name (``from .fitting import _batch``, or ``fitting._batch``
  through an imported module);
- imports run one way, down the layers of ``LAYERS``: a module may import modules of its own layer
  or of a lower one, never of a higher one, and modules of one layer import each other without a
  cycle.

A unit is a top-level module of ppvi (``ppvi/fitting.py``) or a package (``ppvi/estimators/``, all
its submodules together): imports inside a package are its own business. Imports under ``if
TYPE_CHECKING:`` are for annotations only and do not count. A new module must be placed in
``LAYERS``, else the test names it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ppvi"

# Highest layer first. A module may import from its own layer and the layers after it.
LAYERS = [
    ("api", {"__init__", "__main__"}),
    ("cli", {"cli"}),
    ("fit", {"fitting"}),
    (
        "parts",
        {"estimators", "guides", "diagnostics", "gradvar", "evaluate", "runs", "sampling", "compare", "worked_example", "gallery",
         "checkpoint", "plain", "check", "report"},
    ),
    (
        "helpers",
        {"pyro_util", "errors", "data", "rundir", "plots", "images", "init", "convergence", "modeling", "losses", "distributed",
         "config", "results", "batching", "version"},
    ),
]
LAYER_OF = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def _units() -> dict[str, list[Path]]:
    """Unit name -> its source files."""
    units: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if "datasets" in parts or "gallery" in parts[:-1]:  # data files; the gallery copied into a wheel
            continue
        units.setdefault(parts[0], []).append(path)
    return units


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(inner) for inner in ast.walk(child))
    return skipped


def _module_path(path: Path) -> list[str]:
    """The dotted module name of a source file, as a list: ppvi/estimators/score.py -> [ppvi, estimators, score]."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _resolve(path: Path, node: ast.ImportFrom) -> list[str] | None:
    """The absolute module an ImportFrom names, as a list of parts; None outside ppvi."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        return parts if parts[0] == "ppvi" else None
    package = _module_path(path)
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return base + (node.module.split(".") if node.module else [])


def _imports(path: Path):
    """Yield (imported unit, private names imported or read from it, line) for each ppvi import of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    module_aliases = {}  # local name bound to a ppvi unit -> that unit (for attribute reads)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            target = _resolve(path, node)
            if target is None:
                continue
            if len(target) == 1:  # from ppvi import x / from . import x: a unit, or a name of ppvi/__init__
                for alias in node.names:
                    unit = alias.name if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir() else "__init__"
                    if unit != "__init__":
                        module_aliases[alias.asname or alias.name] = unit
                    yield unit, [alias.name] if unit == "__init__" and _is_private(alias.name) else [], node.lineno
            else:
                yield target[1], [alias.name for alias in node.names if _is_private(alias.name)], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ppvi" and len(parts) > 1:
                    if alias.asname:
                        module_aliases[alias.asname] = parts[1]
                    yield parts[1], [], node.lineno
    for node in ast.walk(tree):  # fitting._batch through `from . import fitting`
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            if _is_private(node.attr):
                yield module_aliases[node.value.id], [node.attr], node.lineno


def _edges():
    """(importer unit, imported unit, private names, file:line) for every import between different units."""
    for unit, paths in _units().items():
        for path in paths:
            for imported, private, line in _imports(path):
                if imported != unit:
                    yield unit, imported, private, f"{path.relative_to(PACKAGE.parent)}:{line}"


def private_name_imports() -> list[str]:
    return sorted(f"{where}: {importer} uses {imported}.{name}" for importer, imported, names, where in _edges() for name in names)


def layer_violations() -> list[str]:
    """Upward imports, modules missing from LAYERS, and import cycles within a layer."""
    problems = [f"ppvi/{unit}: not in tests/test_layers.py's LAYERS" for unit in sorted(_units()) if unit not in LAYER_OF]
    same_layer: dict[str, set[str]] = {}
    for importer, imported, _, where in _edges():
        if importer not in LAYER_OF or imported not in LAYER_OF:
            continue
        if LAYER_OF[imported] < LAYER_OF[importer]:
            layer, higher = LAYERS[LAYER_OF[importer]][0], LAYERS[LAYER_OF[imported]][0]
            problems.append(f"{where}: {importer} ({layer}) imports {imported} ({higher}), a higher layer")
        elif LAYER_OF[imported] == LAYER_OF[importer]:
            same_layer.setdefault(importer, set()).add(imported)
    problems += [f"import cycle within a layer: {' -> '.join(cycle)}" for cycle in _cycles(same_layer)]
    return sorted(set(problems))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one unit (depth-first search)."""
    cycles, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start and frozenset(path) not in seen:
                    seen.add(frozenset(path))
                    cycles.append(path + [start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return cycles


def test_the_import_parser_sees_relative_imports_private_names_and_cycles(tmp_path):
    # The checks below pass vacuously if the parser sees nothing: it must find known edges of today's tree.
    edges = {(importer, imported) for importer, imported, _, _ in _edges()}
    assert ("cli", "fitting") in edges and ("fitting", "estimators") in edges and ("compare", "plots") in edges
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _is_private("_batch") and not _is_private("__version__") and not _is_private("batch")
    user = tmp_path / "user.py"
    user.write_text("import ppvi.fitting as f\nfrom ppvi import runs\nfrom ppvi.data import _hidden, Batch\nf._a\nruns._b\nruns.load_run\n")
    found = sorted((unit, tuple(names)) for unit, names, _ in _imports(user) if names)
    assert found == [("data", ("_hidden",)), ("fitting", ("_a",)), ("runs", ("_b",))]


def test_no_module_imports_another_modules_private_name():
    assert private_name_imports() == []


def test_imports_run_one_way_down_the_layers():
    assert layer_violations() == []
