"""Language-model data in one call: text domains -> tokenizer -> packed rows, cached on disk.

`prepare_lm_data(domains, seq_len=, seed=)` loads the domains (built-in names or the
user's `TextDomain`s), trains the byte-level BPE tokenizer on their training splits (or
loads the given one), tokenizes every split once and packs it into rows of `seq_len`:
the train split in a document order shuffled by `seed`, validation and test in id order
(the same rows for every seed, so evaluations compare across seeds). Everything is cached
under `<data_dir>/mtkd_lm/` (`data_dir`: the TFDS data dir, where the built-in domains'
documents are prepared too), keyed by content, so a second call only opens memory maps:

    <data_dir>/mtkd_lm/tokenizers/<key>/tokenizer.json     trained tokenizer (+ meta.json)
    <data_dir>/mtkd_lm/<tok fp>/<domain>-<split fp>-<split>-v1/tokens.bin, lengths.npy
    <data_dir>/mtkd_lm/<tok fp>/<domain>-<split fp>-<split>-v1/packed-L<L>-seed<s>/*.npy

`<key>` hashes the training splits' fingerprints, the vocabulary size and this layout's
version; `<tok fp>` is the tokenizer's fingerprint (first 16 hex digits); `<split fp>` the
split's document fingerprint (`TextDomain.fingerprint`). Writes go to a temporary
directory renamed into place, so an interrupted preparation leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from mtkd_jax.data.corpora import TEXT_DOMAINS, TextDomain, load_domain
from mtkd_jax.data.packing import PackedSplit, num_rows, open_packed, pack_documents, write_packed
from mtkd_jax.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

__all__ = ["LMData", "prepare_lm_data", "tokenize_split"]

SPLITS = ("train", "validation", "test")
_VERSION = 1
_COUNTS = ("num_tokens", "num_bytes", "num_docs")


@dataclasses.dataclass(frozen=True, eq=False)
class LMData:
    """Packed rows per domain and split, the tokenizer, and how they were made.

    Attributes:
      tokenizer: the `TextTokenizer` (its `fingerprint` goes to the sequence cache).
      packed: `packed[domain][split]` is a `PackedSplit` (memory-mapped `[N, L]` arrays).
      domains: the domain names, in the order given.
      root: the cache directory `<data_dir>/mtkd_lm`.
      timings: seconds this call spent on `load_domains`, `tokenizer_train`, `tokenize` and
        `pack`; work found in the cache (or a given tokenizer) counts 0.
    """

    tokenizer: TextTokenizer
    packed: dict[str, dict[str, PackedSplit]]
    domains: tuple[str, ...]
    root: str
    timings: dict[str, float]

    def mixture(self, split: str = "train") -> tuple[PackedSplit, np.ndarray]:
        """All domains' rows of `split` in one `PackedSplit` (in memory, domains in order,
        in their natural proportions) and each row's domain: int32 `[N]` indexing
        `domains`. A batch's `"index"` picks its rows' domains out of it.

        Example:
          >>> import numpy as np
          >>> from mtkd_jax.data import PackedSplit
          >>> a = PackedSplit(*[np.zeros((2, 4), np.int32)] * 5, np.ones(2, np.int64),
          ...                 num_tokens=8, num_bytes=2, num_docs=1)
          >>> b = PackedSplit(*[np.ones((1, 4), np.int32)] * 5, np.ones(1, np.int64),
          ...                 num_tokens=4, num_bytes=1, num_docs=1)
          >>> data = LMData(None, {"p": {"test": a}, "q": {"test": b}}, ("p", "q"), "", {})
          >>> mixed, domain = data.mixture("test")
          >>> len(mixed), mixed.num_tokens, domain.tolist()
          (3, 12, [0, 0, 1])
        """
        parts = [self.packed[d][split] for d in self.domains]
        fields = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(PackedSplit) if f.name not in _COUNTS}
        counts = {c: sum(getattr(p, c) for p in parts) for c in _COUNTS}
        domain = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)])
        return PackedSplit(**fields, **counts), domain

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        """`{domain: {split: {"docs", "rows", "tokens", "bytes"}}}`."""
        return {d: {s: {"docs": p.num_docs, "rows": len(p), "tokens": p.num_tokens,
                        "bytes": p.num_bytes} for s, p in splits.items()}
                for d, splits in self.packed.items()}


def _publish(tmp: str, final: str) -> None:
    """Move a finished temporary directory into place (another process may have won)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_split(texts: Sequence[str], tokenizer: TextTokenizer, path: str | os.PathLike,
                   *, batch_docs: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts`, cached in `path` (`tokens.bin`: int32 ids of all documents
    end to end, streamed to disk; `lengths.npy`).

    Returns memory-mapped `(tokens [T] int32, lengths [n_docs] int64)`; document i is
    `tokens[offset_i : offset_i + lengths[i]]` with offsets the cumulative lengths.
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "lengths.npy")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            lengths = []
            with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
                for i in range(0, len(texts), batch_docs):
                    for j, ids in enumerate(tokenizer.encode(texts[i:i + batch_docs])):
                        if ids.size == 0:
                            raise ValueError(f"Document {i + j} is empty: it encodes to no "
                                             "tokens.")
                        f.write(ids.astype(np.int32).tobytes())
                        lengths.append(ids.size)
            np.save(os.path.join(tmp, "lengths.npy"), np.asarray(lengths, np.int64))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, path)
    return (np.memmap(os.path.join(path, "tokens.bin"), np.int32, mode="r"),
            np.load(os.path.join(path, "lengths.npy")))


def _pack_split(tokens, lengths, tokenizer: TextTokenizer, path: str, *, seq_len: int,
                seed: int | None) -> PackedSplit:
    if os.path.isfile(os.path.join(path, "meta.json")):
        return open_packed(path)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    order = (np.arange(len(lengths)) if seed is None
             else np.random.default_rng(seed).permutation(len(lengths)))
    docs = (tokens[offsets[i]:offsets[i + 1]] for i in order)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
    chunks = pack_documents(docs, seq_len=seq_len, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id, token_bytes=tokenizer.token_bytes)
    try:
        write_packed(tmp, chunks, num_rows=num_rows(lengths, seq_len=seq_len),
                     seq_len=seq_len, meta={"num_docs": len(lengths), "seed": seed,
                                            "tokenizer": tokenizer.fingerprint})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, path)
    return open_packed(path)


def _tokenizer(domains, tokenizer, *, vocab_size: int, root: str) -> tuple[TextTokenizer,
                                                                           float]:
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer, 0.0
    if tokenizer is not None:
        return load_tokenizer(tokenizer), 0.0
    key = hashlib.sha256(json.dumps(
        {"train": [d.fingerprint("train") for d in domains], "vocab_size": vocab_size,
         "version": _VERSION}).encode()).hexdigest()[:16]
    path = os.path.join(root, "tokenizers", key)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(os.path.join(path, "tokenizer.json")), 0.0
    start = time.perf_counter()
    tok = train_tokenizer((t for d in domains for t in d["train"]), vocab_size=vocab_size)
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"fingerprint": tok.fingerprint, "domains": [d.name for d in domains],
                   "vocab_size": tok.vocab_size, "train_seconds": seconds}, f)
    _publish(tmp, path)
    return load_tokenizer(os.path.join(path, "tokenizer.json")), seconds


def prepare_lm_data(
    domains: Sequence[str | TextDomain] = TEXT_DOMAINS, *, seq_len: int = 256, seed: int = 0,
    vocab_size: int = 8192, tokenizer: str | os.PathLike | TextTokenizer | None = None,
    data_dir: str | None = None, split_seed: int = 0, validation_fraction: float = 0.05,
    test_fraction: float = 0.05, max_documents: int | None = None,
) -> LMData:
    """Domains of text to packed, tokenized rows (cached; see the module docstring).

    Args:
      domains: built-in names (`TEXT_DOMAINS`) and/or `TextDomain`s (`load_text_files`,
        `load_jsonl`); names must be unique.
      seq_len: L, positions per row.
      seed: the train split's document order.
      vocab_size: V of a trained tokenizer (ignored when `tokenizer` is given).
      tokenizer: None to train one on the training splits (cached), a `tokenizer.json`
        path, or a `TextTokenizer`.
      data_dir: the TFDS data dir (default `default_data_dir()`).
      split_seed, validation_fraction, test_fraction: the built-in domains' split.
      max_documents: keep at most this many documents per split of each domain
        (`TextDomain.take`), for quick runs and tests; None keeps all.

    Returns:
      `LMData`.
    """
    from mtkd_jax.data.tfds_source import default_data_dir

    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len` must be an int >= 2, got {seq_len!r}.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    data_dir = data_dir or default_data_dir()
    root = os.path.join(data_dir, "mtkd_lm")
    timings = {}
    start = time.perf_counter()
    loaded = [d if isinstance(d, TextDomain) else load_domain(
        d, data_dir=data_dir, split_seed=split_seed, validation_fraction=validation_fraction,
        test_fraction=test_fraction) for d in domains]
    if max_documents is not None:
        loaded = [d.take(max_documents) for d in loaded]
    names = tuple(d.name for d in loaded)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`domains` must be non-empty with unique names, got {names}.")
    timings["load_domains"] = time.perf_counter() - start
    tok, timings["tokenizer_train"] = _tokenizer(loaded, tokenizer, vocab_size=vocab_size,
                                                 root=root)
    timings["tokenize"] = timings["pack"] = 0.0
    packed: dict[str, dict[str, PackedSplit]] = {}
    for d in loaded:
        packed[d.name] = {}
        for split in SPLITS:
            base = os.path.join(root, tok.fingerprint[:16], f"{d.name}-"
                                f"{d.fingerprint(split)[:16]}-{split}-v{_VERSION}")
            where = os.path.join(base, f"packed-L{seq_len}-seed"
                                 f"{seed if split == 'train' else 'none'}")
            fresh = (not os.path.isfile(os.path.join(base, "lengths.npy")),
                     not os.path.isfile(os.path.join(where, "meta.json")))
            start = time.perf_counter()
            tokens, lengths = tokenize_split(d[split], tok, base)
            timings["tokenize"] += (time.perf_counter() - start) * fresh[0]
            start = time.perf_counter()
            packed[d.name][split] = _pack_split(tokens, lengths, tok, where, seq_len=seq_len,
                                                seed=seed if split == "train" else None)
            timings["pack"] += (time.perf_counter() - start) * fresh[1]
    return LMData(tokenizer=tok, packed=packed, domains=names, root=root, timings=timings)
