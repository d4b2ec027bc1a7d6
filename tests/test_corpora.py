"""Text domains: the built-in real-text sources, seeded splits by document, the user's own
text files and JSONL, and their bad-input errors."""

import json
import os

import pytest

from mtkd_jax.data import corpora
from mtkd_jax.data.builders import text_builders

SPLITS = ("train", "validation", "test")


def _docs(n):
    return [(f"doc{i:03d}", f"document number {i}\n") for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    docs = _docs(50)
    a = corpora.split_documents("toy", docs, validation_fraction=0.1, test_fraction=0.2,
                                split_seed=3)
    b = corpora.split_documents("toy", list(reversed(docs)), validation_fraction=0.1,
                                test_fraction=0.2, split_seed=3)
    c = corpora.split_documents("toy", docs, validation_fraction=0.1, test_fraction=0.2,
                                split_seed=4)
    assert [len(a[s]) for s in SPLITS] == [35, 5, 10]
    assert a.ids == b.ids and a.texts == b.texts  # the input order does not matter
    assert a.ids["test"] != c.ids["test"]  # the seed does
    ids = [set(a.ids[s]) for s in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == {i for i, _ in docs}
    for s in SPLITS:  # texts stay with their ids
        assert all(t == f"document number {int(i[3:])}\n"
                   for i, t in zip(a.ids[s], a[s], strict=True))
    assert a.fingerprint("test") != c.fingerprint("test")
    assert a.fingerprint("test") == b.fingerprint("test")


def test_real_domain_slice_splits_by_scene():
    docs = list(text_builders.shakespeare_documents())
    d = corpora.split_documents("shakespeare", docs, split_seed=0)
    assert len(docs) > 700 and len({i for i, _ in docs}) == len(docs)
    assert not set(d.ids["train"]) & set(d.ids["test"])
    # Boundaries kept: every document is one scene headed by its play and act.
    hamlet = dict(docs)["hamlet/001"]
    assert hamlet.startswith("Hamlet\nACT I\nSCENE I. Elsinore.") and "**" not in hamlet
    assert sum(len(t.encode()) for _, t in docs) > 4_000_000


def test_builtin_domains_have_enough_text_cheaply():
    """Bytes, not tokens (the slow test counts tokens): at ~3.7 bytes per token, 500k
    tokens need ~1.9 MB."""
    from pydoc_data.topics import topics

    code = sum(os.path.getsize(p) for _, p in text_builders.stdlib_files())
    assert code > 6_000_000
    assert not any(rel.startswith(("test/", "encodings/", "pydoc_data/"))
                   for rel, _ in text_builders.stdlib_files())
    assert sum(len(t.encode()) for t in topics.values()) > 400_000


def test_docstrings_move_from_code_to_prose():
    source = ('"""Module doc."""\nimport os\n\n\nclass A:\n    """Class doc.\n\n    More.\n'
              '    """\n\n    def f(self):\n        """Only a docstring."""\n\n'
              '    def g(self): "same line"; return 1\n')
    code, docs = text_builders.split_docstrings(source)
    assert docs == ["Module doc.", "Class doc.\n\nMore.", "Only a docstring.", "same line"]
    assert code == ('import os\n\n\nclass A:\n\n    def f(self):\n        pass\n\n'
                    '    def g(self): "same line"; return 1\n')
    compile(code, "<code>", "exec")


def test_text_files_per_file_and_per_line(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text(f"line a{i}\n\nline b{i}\n")
    per_file = corpora.load_text_files(tmp_path, name="mine", validation_fraction=0.25,
                                       test_fraction=0.25)
    assert per_file.name == "mine" and [len(per_file[s]) for s in SPLITS] == [2, 1, 1]
    assert sorted(sum((list(per_file[s]) for s in SPLITS), [])) == [
        f"line a{i}\n\nline b{i}\n" for i in range(4)]
    per_line = corpora.load_text_files(tmp_path, per_line=True)
    assert sum(len(per_line[s]) for s in SPLITS) == 8  # empty lines skipped
    assert "line b2" in sum((list(per_line[s]) for s in SPLITS), [])


def test_jsonl_loader(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": f"text {i} é", "other": 1} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = corpora.load_jsonl(path, field="body")
    assert sorted(sum((list(d[s]) for s in SPLITS), [])) == sorted(r["body"] for r in rows)
    with pytest.raises(ValueError, match=r"docs.jsonl, line 1 has no 'text' field"):
        corpora.load_jsonl(path)
    path.write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(ValueError, match=r"line 2: 'text' is an empty document"):
        corpora.load_jsonl(path)
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        corpora.load_jsonl(path)


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("naïve café".encode() + b" r\xe9sum\xe9\n")
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8 text: invalid byte 0xe9 at "
                                         r"byte offset 14"):
        corpora.load_text_files(bad, per_line=True)
    (tmp_path / "latin.txt").rename(tmp_path / "latin.jsonl")
    with pytest.raises(ValueError, match=r"latin\.jsonl is not UTF-8.*byte offset 14"):
        corpora.load_jsonl(tmp_path / "latin.jsonl")


def test_empty_document_and_empty_domain_are_errors(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("some text\n")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt is an empty document"):
        corpora.load_text_files(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no text"):
        corpora.load_text_files(empty, per_line=True, name="nothing")
    with pytest.raises(ValueError, match="has no text"):
        corpora.split_documents("none", [])
    with pytest.raises(ValueError, match="document 'x' is empty"):
        corpora.split_documents("d", [("x", " \n"), ("y", "a"), ("z", "b")])
    with pytest.raises(ValueError, match="too few for a train, validation and test"):
        corpora.split_documents("two", _docs(2))
    with pytest.raises(ValueError, match="`name` must be one of the text domains"):
        corpora.load_domain("wikipedia")
