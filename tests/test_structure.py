"""The package's shape (docs/architecture.md): a folder is a layer, arrows only downward.

The layers are not written down here: they are derived from the folders. At every level of
the package (the top level, then inside each subpackage), each child module or subpackage is a
node, and A -> B when anything under A imports anything under B. That graph must be acyclic;
its order is the layering (a folder's layer is the length of the longest chain of folders
below it). An upward import is exactly an edge that closes a cycle, so it fails here.
Separately, no two modules may import each other through any chain.

Reads the source with `ast` (nothing is imported), so it sees every import, including the
ones inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mtkd_jax"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str], top: str) -> set[str]:
    """The package modules `name` imports, each resolved to the deepest module that exists
    (`from a.b import c` is `a.b.c` when c is a module, `a.b` when c is a name in it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target.split(".")[0] == top and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    return found


def _graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    known = set(modules)
    return {name: _imports(name, path, known, root.name) for name, path in modules.items()}


def _packages(graph: dict[str, set[str]], root: pathlib.Path) -> list[str]:
    return sorted({m for m in graph if (root.parent / m.replace(".", "/")).is_dir()})


def _child(package: str, module: str) -> str | None:
    """The direct child of `package` that `module` lies under (None if it is not under it)."""
    if not module.startswith(package + "."):
        return None
    return package + "." + module[len(package) + 1:].split(".")[0]


def _folder_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """Children of `package` -> the children they import (the package's own `__init__`,
    which re-exports its children, is not a node)."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        src = _child(package, module)
        if src is None:
            continue
        edges.setdefault(src, set())
        for target in targets:
            dst = _child(package, target)
            if dst is not None and dst != src:
                edges[src].add(dst)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def _layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Layer of each node of an acyclic graph: 0 for a node that imports no sibling, else one
    more than the highest sibling it imports."""
    layer: dict[str, int] = {}

    def of(node):
        if node not in layer:
            layer[node] = 1 + max((of(n) for n in edges.get(node, ())), default=-1)
        return layer[node]

    for node in edges:
        of(node)
    return layer


def _layer_violations(root: pathlib.Path) -> list[str]:
    """Every folder level whose children's import graph has a cycle, one line each."""
    graph = _graph(root)
    wrong = []
    for package in _packages(graph, root):
        edges = _folder_graph(graph, package)
        if cycle := _cycle(edges):
            hops = []
            for a, b in zip(cycle, cycle[1:], strict=False):
                why = sorted(m for m, ts in graph.items() if _child(package, m) == a
                             and any(_child(package, t) == b for t in ts))
                hops.append(f"{a} -> {b} (in {', '.join(why)})")
            wrong.append(f"folders of {package} import each other: " + "; ".join(hops))
    return wrong


def _module_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # A package importing its own children (re-exports) is not a cycle; anything else is.
    edges = {
        m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()
    }
    return _cycle(edges)


def test_folders_form_layers():
    """At every level, the folders (and top-level modules) import each other without cycles:
    the layers are the folders, nothing low imports something high."""
    wrong = _layer_violations(ROOT)
    assert not wrong, "\n".join(wrong)


def test_no_module_import_cycles():
    cycle = _module_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_modules_import_the_module_that_defines_a_name():
    """No library module imports from the public `mtkd_jax/__init__.py`, which sits above
    every layer (it re-exports them all)."""
    wrong = sorted(m for m, ts in _graph().items() if m != "mtkd_jax" and "mtkd_jax" in ts)
    assert not wrong, f"modules importing the top-level namespace: {wrong}"


def test_core_is_the_bottom_and_the_command_the_top():
    """The two ends of the derived layering: the functional core imports no other folder, and
    nothing imports the experiment layer or the command except the layers above them."""
    graph = _graph()
    edges = _folder_graph(graph, "mtkd_jax")
    assert _cycle(edges) is None, "the folders have no layering (test_folders_form_layers)"
    layers = _layers(edges)
    assert edges["mtkd_jax.core"] == set(), edges["mtkd_jax.core"]
    assert layers["mtkd_jax.core"] == 0
    above = {"mtkd_jax.cli", "mtkd_jax.__main__", "mtkd_jax.experiment"}
    for node, targets in edges.items():
        if node not in above:
            assert not targets & above, f"{node} imports {targets & above}"
    assert layers["mtkd_jax.__main__"] > layers["mtkd_jax.cli"] > layers["mtkd_jax.experiment"]
    assert layers["mtkd_jax.experiment"] == max(
        v for k, v in layers.items() if k not in {"mtkd_jax.cli", "mtkd_jax.__main__"})


def test_the_graph_sees_nested_relative_and_submodule_imports():
    """The graph is not vacuous: an import inside a function, and `from package import
    module` (resolved to the module), are both seen."""
    graph = _graph()
    # experiment.students imports the steps inside a function body
    assert "mtkd_jax.training.steps" in graph["mtkd_jax.experiment.students"]
    assert "mtkd_jax.core.checks" in graph["mtkd_jax.core.losses"]
    assert "mtkd_jax.core" not in graph["mtkd_jax.core.losses"]


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _toy(tmp_path: pathlib.Path, extra: dict[str, str]) -> pathlib.Path:
    base = {
        "pkg/__init__.py": "from pkg.top.run import run\n",
        "pkg/low/__init__.py": "",
        "pkg/low/math.py": "def f():\n    return 1\n",
        "pkg/low/more.py": "from pkg.low import math\n",
        "pkg/top/__init__.py": "",
        "pkg/top/run.py": "from pkg.low.math import f\n\ndef run():\n    return f()\n",
    }
    return _write(tmp_path, {**base, **extra}) / "pkg"


def test_the_layer_check_passes_a_clean_tree(tmp_path):
    assert _layer_violations(_toy(tmp_path, {})) == []


@pytest.mark.parametrize("planted", [
    "from pkg.top.run import run\n",                        # at module level
    "def g():\n    from pkg.top import run\n    return run\n",  # inside a function
    "def g():\n    from ..top import run\n    return run\n",    # relative
])
def test_the_layer_check_fails_on_a_planted_upward_import(tmp_path, planted):
    root = _toy(tmp_path, {"pkg/low/more.py": "from pkg.low import math\n" + planted})
    wrong = _layer_violations(root)
    assert len(wrong) == 1 and "pkg.low -> pkg.top" in wrong[0], wrong


def test_the_layer_check_fails_on_a_cycle_inside_a_subfolder(tmp_path):
    root = _toy(tmp_path, {
        "pkg/low/a/__init__.py": "", "pkg/low/a/x.py": "from pkg.low.b import y\n",
        "pkg/low/b/__init__.py": "", "pkg/low/b/y.py": "import pkg.low.a.x\n",
    })
    wrong = _layer_violations(root)
    assert len(wrong) == 1 and wrong[0].startswith("folders of pkg.low "), wrong


def test_the_module_cycle_check_fails_on_a_planted_cycle(tmp_path):
    root = _toy(tmp_path, {"pkg/low/math.py": "from pkg.low import more\n"})
    cycle = _module_cycle(_graph(root))
    assert cycle is not None and set(cycle) == {"pkg.low.math", "pkg.low.more"}, cycle
