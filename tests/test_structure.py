"""The package's shape (docs/architecture.md): small files, no import cycles, arrows downward.

Reads the source with `ast` (nothing is imported), so it sees every import, including the
ones inside functions.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mtkd_jax"
MAX_LINES = 400

# Layer of each top-level module or subpackage of mtkd_jax: a module may import its own layer
# (without cycles) or a lower one. `data` stands apart: it imports only layer 0.
LAYERS = {
    "_checks": 0,
    "divergence": 1,
    "class_sets": 1,
    "reduce": 1,
    "weighting": 1,
    "targets": 1,
    "losses": 1,
    "example_losses": 1,
    "losses_chunked": 1,
    "token_metrics": 1,
    "metrics": 1,
    "precision": 1,
    "data": 1,
    "batch": 2,
    "parallel": 2,
    "sharding": 2,
    "distributed": 2,
    "state": 2,
    "steps": 2,
    "evaluation": 2,
    "models": 2,
    "teachers": 2,
    "checkpoint": 2,
    "_tracking": 2,
    "_fit_run": 3,
    "loop": 3,
    "cache": 3,
    "experiment": 4,
    "cli": 5,
    "__main__": 6,
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The mtkd_jax modules `name` imports (resolved to modules that exist)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("mtkd_jax") and target != name:
                found.add(target)
    return found


def _graph():
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to (`mtkd_jax.cache.reader` ->
    `cache`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_is_over_400_lines():
    big = {
        str(p.relative_to(ROOT.parent)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (one job per file): {big}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "mtkd_jax" or nxt.startswith(node + "."):
                continue  # a package's own re-exports are not a cycle
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node != "mtkd_jax" and state.get(node) is None:
            visit(node)


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _modules()} - {""}
    assert units == set(LAYERS), f"modules without a layer: {units - set(LAYERS)}"


def test_nothing_low_imports_something_high():
    wrong = []
    for module, imports in _graph().items():
        unit = _unit(module)
        if not unit:
            continue  # mtkd_jax/__init__.py: the public namespace re-exports every layer
        for target in imports:
            other = _unit(target)
            if not other or other == unit:
                continue
            if LAYERS[other] > LAYERS[unit] or (unit == "data" and LAYERS[other] > 0):
                wrong.append(f"{module} (layer {LAYERS[unit]}) imports {target} "
                             f"(layer {LAYERS[other]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    """The graph is not vacuous: nested imports and relative imports are found."""
    graph = _graph()
    assert "mtkd_jax.steps" in graph["mtkd_jax.experiment.students"]
    assert "mtkd_jax._checks" in graph["mtkd_jax.losses"]
    assert any(t.startswith("mtkd_jax.cache") for t in graph["mtkd_jax.experiment.runner"]) or \
        graph["mtkd_jax.experiment.runner"]
