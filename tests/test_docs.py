"""Every ```python block of README.md and docs/*.md runs as written (docs/results/ excluded).

Blocks are found by parsing the fences, never by heading text. A page's blocks run in order in
one namespace (a fresh module per page), so a later block may use an earlier block's names; each
block is one test, `test_doc_block[<page>-<index>]`, and running one block alone first runs the
page's earlier blocks. Code compiles with the page's own line numbers, so a traceback points at
the markdown line.

Markers, an HTML comment on the line right before the fence (visible in the page's source):

* ``<!-- not run: REASON -->``: shown, not run (e.g. it needs several hosts); REASON is shown as
  the skip reason. Keep them rare.
* ``<!-- slow -->``: runs only under ``-m slow``.

A not-run or slow block is not run as a prerequisite of the page's later blocks, so those must
not use its names. ```bash blocks are not run. Each page runs in its own temporary working
directory; the weighting registry is restored after the module.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*(not run|slow)\s*(?::\s*(.*?))?\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    index: int  # among the page's python blocks, from 0
    line: int  # 1-based line of the block's first code line
    code: str
    marker: str | None  # "not run", "slow" or None
    reason: str


def python_blocks(text: str, rel: str) -> list[Block]:
    """The ```python blocks of markdown `text` (the page `rel`), with their markers."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence[0] * len(fence))
            and set(lines[end].strip()) == {fence[0]}
        ):
            end += 1
        if end == len(lines):
            raise ValueError(f"{rel}:{i + 1}: a code fence that is never closed.")
        if lang == "python":
            before = next((s for s in reversed(lines[:i]) if s.strip()), "")
            marker, reason = None, ""
            if before.strip().startswith("<!--"):
                mm = _MARKER.match(before)
                if not mm or (mm.group(1) == "not run" and not mm.group(2)):
                    raise ValueError(
                        f"{rel}:{i + 1}: the comment before this block, {before.strip()!r}, is "
                        "not a marker: use '<!-- not run: REASON -->' or '<!-- slow -->'."
                    )
                marker, reason = mm.group(1), mm.group(2) or ""
            code = "\n".join(lines[i + 1:end]) + "\n"
            out.append(Block(rel, len(out), i + 2, code, marker, reason))
        i = end + 1
    return out


BLOCKS = {
    p.relative_to(ROOT).as_posix(): python_blocks(p.read_text(), p.relative_to(ROOT).as_posix())
    for p in PAGES
}


def _params():
    for blocks in BLOCKS.values():
        for b in blocks:
            marks = []
            if b.marker == "not run":
                marks.append(pytest.mark.skip(reason=f"not run: {b.reason}"))
            elif b.marker == "slow":
                marks.append(pytest.mark.slow)
            yield pytest.param(b, id=f"{b.page}-{b.index}", marks=marks)


@dataclasses.dataclass
class _PageRun:
    module: types.ModuleType
    workdir: pathlib.Path
    done: set[int] = dataclasses.field(default_factory=set)
    failed: int | None = None


_RUNS: dict[str, _PageRun] = {}


@pytest.fixture(scope="module", autouse=True)
def _restore_registries():
    from mtkd_jax import weighting

    saved = dict(weighting.WEIGHTINGS)
    yield
    weighting.WEIGHTINGS.clear()
    weighting.WEIGHTINGS.update(saved)
    for name in [n for n in sys.modules if n.startswith("_docs_")]:
        del sys.modules[name]


def _execute(block: Block, run: _PageRun) -> None:
    # Blank lines in front keep the page's line numbers in tracebacks.
    code = compile("\n" * (block.line - 1) + block.code, str(ROOT / block.page), "exec")
    old = os.getcwd()
    os.chdir(run.workdir)
    try:
        exec(code, run.module.__dict__)
    except BaseException:
        run.failed = block.index
        raise
    finally:
        os.chdir(old)
    run.done.add(block.index)


def test_blocks_are_found_by_their_fences():
    page = "\n".join([
        "# t", "```bash", "echo no", "```", "text", "```python", "a = 1", "```", "",
        "<!-- not run: needs 4 hosts -->", "", "```python", "b = a", "```",
        "<!-- slow -->", "````python", "c = '```'", "````", "```py", "d = 0", "```",
    ])
    blocks = python_blocks(page, "t.md")
    assert [(b.index, b.line, b.code, b.marker, b.reason) for b in blocks] == [
        (0, 7, "a = 1\n", None, ""),
        (1, 13, "b = a\n", "not run", "needs 4 hosts"),
        (2, 17, "c = '```'\n", "slow", ""),
    ]
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n", "t.md")
    with pytest.raises(ValueError, match="not a marker"):
        python_blocks("<!-- not-run -->\n```python\nx = 1\n```\n", "t.md")
    with pytest.raises(ValueError, match="not a marker"):
        python_blocks("<!-- not run -->\n```python\nx = 1\n```\n", "t.md")


def test_every_page_is_collected():
    """README.md and every docs/*.md page (not docs/results/) are read; README has blocks."""
    want = {"README.md"} | {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert set(BLOCKS) == want and BLOCKS["README.md"]
    # Python under another fence name would be shown but never run.
    other = re.compile(r"^ {0,3}(?:`{3,}|~{3,})\s*(py|python3|pycon|ipython)\s*$", re.M | re.I)
    found = [(p.name, m.group(1)) for p in PAGES for m in other.finditer(p.read_text())]
    assert not found, f"use ```python for Python blocks: {found}"


def test_relative_links_resolve():
    """Every relative markdown link or image of the pages names a file that exists."""
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
    broken = []
    for page in PAGES:
        for target in link.findall(page.read_text()):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


@pytest.mark.parametrize("block", _params())
def test_doc_block(block: Block, tmp_path_factory):
    name = "_docs_" + re.sub(r"\W", "_", block.page)
    run = _RUNS.get(block.page)
    if run is None:
        module = types.ModuleType(name)
        sys.modules[name] = module  # classes defined in a block resolve their module
        run = _RUNS[block.page] = _PageRun(module, tmp_path_factory.mktemp(name))
    for earlier in BLOCKS[block.page][: block.index]:
        if earlier.index in run.done or earlier.marker is not None:
            continue
        if run.failed == earlier.index:
            pytest.fail(f"{block.page}: block {earlier.index} (line {earlier.line}) failed.")
        _execute(earlier, run)
    _execute(block, run)
