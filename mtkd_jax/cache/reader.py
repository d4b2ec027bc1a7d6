"""Reading a teacher cache: `open_cache`, `TeacherCache` lookups, `with_cached_logits`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from mtkd_jax.cache.format import fingerprint_sha, load_shard, read_headers
from mtkd_jax.cache.topk import DEFAULT_FILL, TopK, check_fill, check_prior, expand_top_k_host

__all__ = ["TeacherCache", "open_cache", "with_cached_logits", "with_cached_top_k"]


class TeacherCache:
    """Cached teacher outputs, read back per batch. Built by `build_cache`, or `open_cache`.

    Attributes:
      path: the cache directory.
      header: the JSON header of the first shard (kind, sizes, dtype, fingerprint, meta).
      num_examples, num_views, num_teachers, num_classes: N, V, K, C.
      top_k: k, or None for full logits.
      tail_samples: m, the sampled tail slots stored after the k (`build_cache(tail_samples=)`;
        0 for a plain top-k cache). Lookups return k + m slots.
      seq_len: L for a sequence (token) cache, else None.
      tokenizer: the tokenization fingerprint a sequence cache was built with (or None).
      fill: how top-k entries are reconstructed (``"renormalize"``, ``"uniform"`` or
        ``"prior"``).
      shards: names of the shards read ("" for an unsharded cache).
    """

    def __init__(self, path: str, headers: dict[str, dict], *, fill: str = DEFAULT_FILL,
                 prior=None):
        check_fill(fill)
        self.path, self.fill = path, fill
        self.shards = sorted(headers)
        h = self.header = headers[self.shards[0]]
        self.num_examples, self.num_views = h["num_examples"], h["num_views"]
        self.num_teachers, self.num_classes = h["num_teachers"], h["num_classes"]
        self._log_prior = check_prior(prior, self.num_classes, fill)
        self.top_k = h["top_k"]
        self.tail_samples = int(h.get("tail_samples") or 0)
        self.seq_len, self.tokenizer = h.get("seq_len"), h.get("tokenizer")
        self._values, self._classes, self._rest, self._written = [], [], [], []
        for shard in self.shards:
            arrays = load_shard(path, shard or None, self.top_k)
            self._values.append(arrays["values"])
            self._written.append(arrays["written"])
            if self.top_k is not None:
                self._classes.append(arrays["classes"])
                self._rest.append(arrays["rest"])
        # With several shards, which one holds each (view, example): -1 where none does.
        self._owner = None
        if len(self.shards) > 1:
            owner = np.full((self.num_views, self.num_examples), -1, np.int16)
            for i, written in enumerate(self._written):
                owner[(owner < 0) & (np.asarray(written) > 0)] = i
            self._owner = owner

    def __repr__(self) -> str:
        kind = "logits" if self.top_k is None else f"top_k={self.top_k}" + (
            f"+{self.tail_samples} sampled" if self.tail_samples else "")
        return (
            f"TeacherCache({self.path!r}, N={self.num_examples}, views={self.num_views}, "
            f"K={self.num_teachers}, C={self.num_classes}, {kind}, "
            f"dtype={self.header['dtype']}, shards={len(self.shards)})"
        )

    @property
    def bytes_per_example(self) -> int:
        """Bytes stored per example and view (values, indices, remainder, written flag)."""
        h = self.header
        width = self.num_classes if self.top_k is None else self.top_k + self.tail_samples
        rows = self.num_teachers * (self.seq_len or 1)
        n = rows * width * np.dtype(h["dtype"]).itemsize
        if self.top_k is not None:
            n += rows * width * np.dtype(h["index_dtype"]).itemsize
            n += rows * np.dtype(h["dtype"]).itemsize  # log_rest
        return int(n + 1)

    @property
    def num_written(self) -> int:
        """How many (view, example) entries hold teacher outputs."""
        if self._owner is not None:
            return int(np.sum(self._owner >= 0))
        return int(np.sum(np.asarray(self._written[0]) > 0))

    def _rows(self, index, view):
        index = np.asarray(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(
                f"`index` must be a 1-D integer array [B], got {index.dtype}{list(index.shape)}."
            )
        if index.size and (index.min() < 0 or index.max() >= self.num_examples):
            raise ValueError(
                f"`index` values must be in [0, {self.num_examples}) (the cached examples), "
                f"got range [{index.min()}, {index.max()}]."
            )
        if view is None:
            if self.num_views != 1:
                raise ValueError(
                    f"The cache holds {self.num_views} views per example: pass `view` (a "
                    "scalar or [B] ints, e.g. batch['view'])."
                )
            view = 0
        given = np.asarray(view)
        try:
            view = np.broadcast_to(given, index.shape)
        except ValueError:
            view = None
        if view is None or (
            not np.issubdtype(view.dtype, np.integer)
            or (view.size and (view.min() < 0 or view.max() >= self.num_views))
        ):
            raise ValueError(
                f"`view` must be integers in [0, {self.num_views}) with the shape of `index` "
                f"{index.shape}, got {given.dtype}{list(given.shape)}."
            )
        return index, view

    def _gather(self, arrays, index, view):
        """Rows `[B, ...]` of `arrays` (one per shard) at (view, index), refusing unwritten ones."""
        if self._owner is None:
            written = self._written[0][view, index]
            if not np.all(written):
                self._missing(index, view, written == 0)
            return arrays[0][view, index]
        owner = self._owner[view, index]
        if np.any(owner < 0):
            self._missing(index, view, owner < 0)
        out = np.empty((len(index),) + arrays[0].shape[2:], arrays[0].dtype)
        for s in np.unique(owner):
            sel = owner == s
            out[sel] = arrays[s][view[sel], index[sel]]
        return out

    def _missing(self, index, view, mask):
        pairs = list(zip(index[mask].tolist(), view[mask].tolist(), strict=True))[:5]
        raise ValueError(
            f"{int(mask.sum())} of the requested examples are not in the cache (first "
            f"(index, view) pairs: {pairs}); build it over every example and view "
            "(e.g. batches with drop_remainder=False)."
        )

    def lookup_top_k(self, index, view=None) -> TopK:
        """The stored top-k entries of a batch, `TopK` with the teacher axis first.

        Feed them to `expand_top_k` inside a jitted step to expand on the device. Arguments
        as in `lookup`.
        """
        if self.top_k is None:
            raise ValueError("This cache holds full logits (top_k=None); use `lookup`.")
        index, view = self._rows(index, view)
        values = self._gather(self._values, index, view)
        classes = self._gather(self._classes, index, view)
        rest = self._gather(self._rest, index, view)
        return TopK(np.swapaxes(values, 0, 1), np.swapaxes(classes, 0, 1),
                    np.swapaxes(rest, 0, 1))

    def lookup(self, index, view=None) -> np.ndarray:
        """Teacher logits `[K, B, C]` (`[K, B, L, V]` for a sequence cache) float32 for a
        batch's examples, ready for the distill step.

        Args:
          index: `[B]` example indices (a batch's `"index"`).
          view: the augmented view of each example, a scalar or `[B]` ints (a batch's
            `"view"`); may be omitted when the cache holds one view.

        Returns:
          `[K, B, C]` float32: the stored logits, or the top-k logits reconstructed with
          `fill` (`mtkd_jax.cache.topk`).

        Raises:
          ValueError: an index or view out of range, or an entry that was never written.
        """
        if self.top_k is not None:
            return expand_top_k_host(self.lookup_top_k(index, view), self.num_classes,
                                     self.fill, self._log_prior)
        index, view = self._rows(index, view)
        return np.swapaxes(self._gather(self._values, index, view), 0, 1).astype(np.float32)


def open_cache(
    path: str | os.PathLike,
    *,
    expect_fingerprint: dict | str | None = None,
    fill: str = DEFAULT_FILL,
    shards: Iterable[str] | None = None,
    expect_tokenizer: str | None = None,
    prior=None,
) -> TeacherCache:
    """Open a cache written by `build_cache` (every shard in `path`, or only `shards`).

    Args:
      path: the cache directory.
      expect_fingerprint: the teachers the caller distills from
        (`mtkd_jax.training.checkpoint.params_fingerprint(tp)`, or its sha256); a cache built from
        other teachers is refused.
      fill: reconstruction of top-k entries, ``"renormalize"``, ``"uniform"``
        (`DEFAULT_FILL`) or ``"prior"`` (see `mtkd_jax.cache.topk`).
      shards: shard names to read (default all).
      expect_tokenizer: the tokenization fingerprint of the caller's inputs (e.g.
        `mtkd_jax.data.TextTokenizer.fingerprint`); a sequence cache built with another
        tokenization (or a cache that records none) is refused.
      prior: for ``fill="prior"``: `[C]` positive weights of the classes (e.g. token counts
        of the training text plus one), normalised here.

    Returns:
      A `TeacherCache`.

    Raises:
      FileNotFoundError: no finished cache in `path`.
      ValueError: the fingerprint differs, or shards disagree.

    Example:
      >>> import tempfile, numpy as np, jax.numpy as jnp
      >>> from mtkd_jax.cache import build_cache, open_cache
      >>> w = jnp.stack([jnp.eye(3), 2 * jnp.eye(3)])                     # K=2 teachers
      >>> apply = lambda tp, x: jnp.einsum("kcd,bd->kbc", tp, x)
      >>> x = np.eye(3, dtype=np.float32)
      >>> path = tempfile.mkdtemp()
      >>> _ = build_cache(path, apply, w, [{"x": x, "index": np.arange(3)}], num_examples=3,
      ...                 dtype=np.float32, progress=False)
      >>> cache = open_cache(path)
      >>> cache.lookup(np.array([2, 0]))[1].tolist()
      [[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]]
      >>> open_cache(path, expect_fingerprint="0" * 64)
      Traceback (most recent call last):
      ...
      ValueError: The cache in ... was built from other teachers ...
    """
    check_fill(fill)
    want = fingerprint_sha(expect_fingerprint)
    if isinstance(expect_fingerprint, dict) and want is None:
        raise ValueError(
            "`expect_fingerprint` must be a fingerprint dict with a 'sha256' entry (from "
            f"`params_fingerprint`), got keys {sorted(expect_fingerprint)}."
        )
    path = os.path.abspath(os.fspath(path))
    headers = read_headers(path, shards)
    have = fingerprint_sha(next(iter(headers.values()))["fingerprint"])
    if want is not None and want != have:
        raise ValueError(
            f"The cache in {path} was built from other teachers (fingerprint sha256 {have}, "
            f"expected {want}); rebuild it with `build_cache` for these teachers."
        )
    if expect_tokenizer is not None:
        got = next(iter(headers.values())).get("tokenizer")
        if got != expect_tokenizer:
            raise ValueError(
                f"The cache in {path} was built with another tokenization (tokenizer "
                f"fingerprint {got!r}, expected {expect_tokenizer!r}): its token positions "
                "and vocabulary do not match these inputs; rebuild it with `build_cache(..., "
                "tokenizer=...)`."
            )
    return TeacherCache(path, headers, fill=fill, prior=prior)


def _check_indexed(batch) -> None:
    """A batch that a cache can be read for: a dict with 'index' (ValueError otherwise)."""
    if not isinstance(batch, dict) or "index" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"each batch of `batch_iter` must be a dict with 'index' [B] (and 'view' [B] "
            f"for a cache of several views), got {got}."
        )


def with_cached_logits(
    batch_iter: Iterable[dict], cache: TeacherCache, *, key: str = "teacher_logits"
) -> Iterator[dict]:
    """Add `batch[key] = cache.lookup(batch["index"], batch.get("view"))` to every batch.

    The distill step built with `teacher_apply=None` reads `batch["teacher_logits"]`
    `[K, B, C]` instead of running teachers.

    Example:
      >>> import tempfile, numpy as np, jax.numpy as jnp
      >>> from mtkd_jax.cache import build_cache, with_cached_logits
      >>> apply = lambda tp, x: jnp.stack([x @ tp, -x @ tp])
      >>> batch = {"x": np.eye(4, dtype=np.float32), "index": np.arange(4)}
      >>> cache = build_cache(tempfile.mkdtemp(), apply, jnp.eye(4), [batch], num_examples=4,
      ...                     top_k=2, progress=False)
      >>> next(with_cached_logits([batch], cache))["teacher_logits"].shape
      (2, 4, 4)
    """
    for batch in batch_iter:
        _check_indexed(batch)
        yield {**batch, key: cache.lookup(batch["index"], batch.get("view"))}


def with_cached_top_k(batch_iter: Iterable[dict], cache: TeacherCache) -> Iterator[dict]:
    """Add `batch["teacher_top_k"] = cache.lookup_top_k(batch["index"], batch.get("view"))`
    to every batch: the compact entries (`TopK`, stored dtypes, teacher axis first), which the
    distill step built with `teacher_apply=None` distils in their slot space without
    expanding them to the C classes (`mtkd_jax.objective.top_k_slots`, T = 1): about k/C of
    `with_cached_logits`' bytes and none of its `[K, B, C]` work.

    Example:
      >>> import tempfile, numpy as np, jax.numpy as jnp
      >>> from mtkd_jax.cache import build_cache, with_cached_top_k
      >>> apply = lambda tp, x: jnp.stack([x @ tp, -x @ tp])
      >>> batch = {"x": np.eye(4, dtype=np.float32), "index": np.arange(4)}
      >>> cache = build_cache(tempfile.mkdtemp(), apply, jnp.eye(4), [batch], num_examples=4,
      ...                     top_k=2, progress=False)
      >>> next(with_cached_top_k([batch], cache))["teacher_top_k"].classes.shape
      (2, 4, 2)
    """
    for batch in batch_iter:
        _check_indexed(batch)
        yield {**batch, "teacher_top_k": cache.lookup_top_k(batch["index"], batch.get("view"))}
