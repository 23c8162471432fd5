"""The dependency rule of docs/architecture.md, checked on the source (every import, lazy ones included).

* ``core`` imports no front-end (``backend``, ``napari_plugin``, ``training_loop``) and not the CLI;
* ``backend`` and ``napari_plugin`` import neither ``training_loop`` nor each other (nor the CLI);
* ``training_loop`` imports neither ``backend``, ``napari_plugin`` nor the CLI;
* ``cli`` is the composition root and may import everything;
* the import graph of the package's modules has no cycle;
* only ``core/store`` imports SQLAlchemy, Alembic or the store's tables (everyone else calls the store).

Imports are read with ``ast`` from every ``.py`` file, wherever they sit (module level, inside functions,
under ``if TYPE_CHECKING``), plus ``importlib.import_module("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "surgenet_assist"
LAYERS = ("core", "backend", "napari_plugin", "training_loop", "cli")
FORBIDDEN = {
    "core": {"backend", "napari_plugin", "training_loop", "cli"},
    "backend": {"napari_plugin", "training_loop", "cli"},
    "napari_plugin": {"backend", "training_loop", "cli"},
    "training_loop": {"backend", "napari_plugin", "cli"},
    "cli": set(),
}


def _module_files() -> dict[str, Path]:
    """Module name -> file for every module of the package (``pkg/__init__.py`` is named ``pkg``)."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = [PACKAGE, layer, *path.relative_to(ROOT / layer).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Absolute names imported anywhere in ``tree``: ``from a import b`` names the module ``a.b`` when there
    is one, else ``a`` (a package's ``__init__`` runs anyway when one of its modules is imported, so parent
    packages are not counted as imports)."""
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            yield node.args[0].value


def _resolve(name: str) -> str | None:
    """The package module a name refers to: itself if a module, else its longest module prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, source: str | None = None) -> set[str]:
    """Modules of the package that ``module`` imports (``source`` overrides the file, for the self-test)."""
    path = MODULES.get(module)
    text = source if source is not None else path.read_text(encoding="utf-8")  # type: ignore[union-attr]
    is_package = path is not None and path.name == "__init__.py"
    tree = ast.parse(text, filename=str(path or module))
    out = set()
    for name in _imported_names(tree, module, is_package):
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            target = _resolve(name)
            if target is not None and target != module:
                out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _layer(module: str) -> str:
    return module.split(".")[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None`` (iterative DFS, deterministic order)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_scan_sees_the_whole_package():
    assert {_layer(m) for m in MODULES} == set(LAYERS)
    assert "surgenet_assist.core.store.label_store" in MODULES
    assert "surgenet_assist.core.store" in GRAPH["surgenet_assist.training_loop.nightly"]


def test_lazy_relative_and_dynamic_imports_are_seen():
    source = (
        "from .store import LabelStore\n"
        "from .store.writer import chunks\n"
        "from . import zoo\n"
        "def f():\n"
        "    from surgenet_assist.training_loop.acquisition import STRATEGIES\n"
        "    import importlib\n"
        "    importlib.import_module('surgenet_assist.backend.app')\n"
    )
    found = imports_of("surgenet_assist.core.example", source)
    assert found == {
        "surgenet_assist.core.store",
        "surgenet_assist.core.store.writer",
        "surgenet_assist.core.zoo",
        "surgenet_assist.training_loop.acquisition",
        "surgenet_assist.backend.app",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_follow_the_dependency_rule(layer):
    broken = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if _layer(m) == layer
        for t in targets
        if _layer(t) in FORBIDDEN[layer]
    )
    assert not broken, f"{layer} must not import {sorted(FORBIDDEN[layer])}:\n" + "\n".join(broken)


def test_only_the_store_touches_the_database():
    """Tables, SQL and migrations are the store's business: front-ends call LabelStore methods."""
    outside = [m for m in MODULES if not m.startswith(f"{PACKAGE}.core.store")]
    tables = f"{PACKAGE}.core.store.models"
    broken = []
    for m in outside:
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        is_package = MODULES[m].name == "__init__.py"
        for name in _imported_names(tree, m, is_package):
            if name.split(".")[0] in ("sqlalchemy", "alembic") or name.startswith(tables):
                broken.append(f"{m} imports {name}")
    assert not broken, "\n".join(sorted(set(broken)))


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
