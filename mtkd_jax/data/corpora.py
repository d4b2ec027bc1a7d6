"""Text domains: documents of real text split by document into train / validation / test.

A `TextDomain` holds one domain's documents (Python strings, document boundaries kept) in
three splits. Sources:

* the built-in domains (`TEXT_DOMAINS`: `"python_code"`, `"python_docs"`, `"shakespeare"`,
  see `mtkd_jax.data.builders.text_builders`), prepared on first use into the TFDS data dir
  like the offline image datasets (`prepare_offline`) and read back from there;
* the user's own text: plain `.txt` files, one document per file or per line
  (`load_text_files`), or JSONL with a text field (`load_jsonl`).

The split is by document and seeded: documents sorted by id, permuted by `split_seed`, the
first `round(test_fraction * n)` are test, the next `round(validation_fraction * n)`
validation, the rest train (each split keeps id order). Bad input is an error: a file that
is not UTF-8 (the message names the file and the byte offset), an empty document (a file
or JSONL record with no text; empty *lines* in one-document-per-line files are skipped), a
domain with no text or too few documents for three splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["TEXT_DOMAINS", "TextDomain", "load_domain", "load_jsonl", "load_text_files",
           "read_utf8", "split_documents"]

TEXT_DOMAINS = ("python_code", "python_docs", "shakespeare")
"""The built-in domains of real text, available offline after the project's install."""
_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class TextDomain:
    """One domain's documents: `texts[split]` and `ids[split]`, tuples of equal length.

    `domain["train"]` is `domain.texts["train"]`; `fingerprint(split)` is the sha256 of the
    split's documents (their identity for caches of tokens and packed rows).
    """

    name: str
    texts: dict[str, tuple[str, ...]]
    ids: dict[str, tuple[str, ...]]
    source: str

    def __getitem__(self, split: str) -> tuple[str, ...]:
        if split not in _SPLITS:
            raise KeyError(f"Unknown split {split!r}; the splits are {_SPLITS}.")
        return self.texts[split]

    def fingerprint(self, split: str) -> str:
        h = hashlib.sha256()
        for doc_id, text in zip(self.ids[split], self[split], strict=True):
            h.update(doc_id.encode() + b"\x00" + text.encode() + b"\x01")
        return h.hexdigest()

    def take(self, max_documents: int) -> TextDomain:
        """At most `max_documents` of each split, evenly spaced in id order (for quick runs).

        Example:
          >>> d = split_documents("toy", [(f"d{i:02d}", "t") for i in range(40)])
          >>> [len(d.take(5)[s]) for s in ("train", "validation", "test")]
          [5, 2, 2]
        """
        if not isinstance(max_documents, int) or max_documents < 1:
            raise ValueError(f"`max_documents` must be a positive int, got {max_documents!r}.")
        keep = {s: np.unique(np.linspace(0, len(self[s]) - 1, min(max_documents, len(self[s])))
                             .round().astype(int)) for s in _SPLITS}
        return TextDomain(
            name=self.name, texts={s: tuple(self.texts[s][i] for i in keep[s]) for s in _SPLITS},
            ids={s: tuple(self.ids[s][i] for i in keep[s]) for s in _SPLITS},
            source=f"{self.source}; at most {max_documents} documents per split")

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's documents."""
        return sum(len(t.encode()) for t in self[split])


def split_documents(
    name: str, documents: Iterable[tuple[str, str]], *, validation_fraction: float = 0.05,
    test_fraction: float = 0.05, split_seed: int = 0, source: str = "",
) -> TextDomain:
    """Split `(id, text)` documents by document into a `TextDomain`, deterministic by seed.

    Example:
      >>> docs = [(f"d{i}", f"text {i}") for i in range(10)]
      >>> d = split_documents("toy", docs, validation_fraction=0.2, test_fraction=0.1)
      >>> [len(d[s]) for s in ("train", "validation", "test")]
      [7, 2, 1]
    """
    for f, arg in ((validation_fraction, "validation_fraction"), (test_fraction,
                                                                   "test_fraction")):
        if not 0 < f < 1:
            raise ValueError(f"`{arg}` must be in (0, 1), got {f}.")
    if validation_fraction + test_fraction >= 1:
        raise ValueError("`validation_fraction + test_fraction` must be < 1, got "
                         f"{validation_fraction + test_fraction}.")
    docs = sorted(documents)
    if not docs:
        raise ValueError(f"Text domain {name!r} has no text: no non-empty document.")
    for doc_id, text in docs:
        if not text.strip():
            raise ValueError(f"Text domain {name!r}: document {doc_id!r} is empty.")
    if len({i for i, _ in docs}) != len(docs):
        raise ValueError(f"Text domain {name!r}: document ids are not unique.")
    n = len(docs)
    n_test, n_val = (max(1, round(f * n)) for f in (test_fraction, validation_fraction))
    if n - n_test - n_val < 1:
        raise ValueError(
            f"Text domain {name!r} has {n} documents: too few for a train, validation and "
            "test split of at least one document each (split long text per line, or add "
            "documents)."
        )
    order = np.random.default_rng(split_seed).permutation(n)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    texts, ids = {}, {}
    for split in _SPLITS:
        chosen = [docs[i] for i in np.sort(parts[split])]
        ids[split] = tuple(i for i, _ in chosen)
        texts[split] = tuple(t for _, t in chosen)
    note = (f"{source}; split by document, seed {split_seed}, validation "
            f"{validation_fraction}, test {test_fraction}")
    return TextDomain(name=name, texts=texts, ids=ids, source=note)


def load_domain(
    name: str, *, data_dir: str | None = None, validation_fraction: float = 0.05,
    test_fraction: float = 0.05, split_seed: int = 0,
) -> TextDomain:
    """A built-in text domain (`TEXT_DOMAINS`), prepared on first use in the TFDS data dir.

    Preparing reads the installed files (about 15 s for the Python domains); later calls
    read the prepared documents (`<data_dir>/lm_<name>/<version>`).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     plays = load_domain("shakespeare", data_dir=d)
      >>> len(plays["test"]) > 30, plays["train"][0].splitlines()[0]
      (True, "A Midsummer Night's Dream")
    """
    from mtkd_jax.data.tfds_source import default_data_dir, prepare_offline

    if name not in TEXT_DOMAINS:
        raise ValueError(f"`name` must be one of the text domains {TEXT_DOMAINS}, got {name!r}.")
    data_dir = data_dir or default_data_dir()
    builder = prepare_offline(name, data_dir)
    source = builder.as_data_source(split="documents")
    docs = []
    for i in range(len(source)):
        ex = source[i]
        docs.append((ex["id"].decode(), ex["text"].decode()))
    return split_documents(
        name, docs, validation_fraction=validation_fraction, test_fraction=test_fraction,
        split_seed=split_seed, source=f"tfds:{builder.name}:{builder.version} at {data_dir}")


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a file, which must be UTF-8 (a leading BOM is dropped).

    Raises:
      ValueError: naming the file and the byte offset of the first invalid byte.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{os.fspath(path)!s} is not UTF-8 text: invalid byte {data[e.start]:#04x} at "
            f"byte offset {e.start} ({e.reason}). Convert it, e.g. with "
            "`iconv -f latin1 -t utf-8`."
        ) from None


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike], suffix: str) -> list[str]:
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            out += sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs
                          if f.endswith(suffix))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"No such file or directory: {p!r}.")
    if not out:
        raise ValueError(f"No {suffix} files in {list(map(os.fspath, paths))}.")
    return out


def load_text_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, name: str = "text",
    per_line: bool = False, **split_kwargs,
) -> TextDomain:
    """The user's plain text as a `TextDomain`: one document per file, or per line.

    Args:
      paths: files, or directories searched recursively for `*.txt` files.
      name: the domain's name.
      per_line: one document per non-empty line (empty lines are skipped) instead of one
        per file (an empty file is then an error).
      **split_kwargs: `validation_fraction`, `test_fraction`, `split_seed` of
        `split_documents`.

    Raises:
      ValueError: a file that is not UTF-8 (file and byte offset named), an empty file (one
        document per file), a domain with no text or too few documents.
    """
    docs = []
    for path in _expand(paths, ".txt"):
        text = read_utf8(path)
        if per_line:
            docs += [(f"{path}:{i + 1}", line) for i, line in enumerate(text.splitlines())
                     if line.strip()]
        elif not text.strip():
            raise ValueError(f"{path} is an empty document (no text).")
        else:
            docs.append((path, text))
    return split_documents(name, docs, source=f"text files ({'lines' if per_line else 'files'})",
                           **split_kwargs)


def load_jsonl(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, name: str = "jsonl",
    field: str = "text", **split_kwargs,
) -> TextDomain:
    """The user's JSONL (one JSON object per line, the document in `field`) as a `TextDomain`.

    Blank lines are skipped; a record without `field`, with a non-string or empty text, or a
    line that is not JSON is an error naming the file and line. Directories are searched
    for `*.jsonl` files.
    """
    docs = []
    for path in _expand(paths, ".jsonl"):
        for i, line in enumerate(read_utf8(path).splitlines()):
            if not line.strip():
                continue
            where = f"{path}, line {i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON: {e.msg}.") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{where} has no {field!r} field (set `field=`).")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: {field!r} is {type(text).__name__}, not text.")
            if not text.strip():
                raise ValueError(f"{where}: {field!r} is an empty document.")
            docs.append((f"{path}:{i + 1}", text))
    return split_documents(name, docs, source=f"JSONL field {field!r}", **split_kwargs)
