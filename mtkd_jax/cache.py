r"""Teacher-output cache: run the teachers once, then distill from disk without them.

Teachers dominate the cost of online distillation (3 conv teachers are ~93% of a step's FLOPs
in `benchmarks/run.py`). When the teachers are frozen and the inputs of an epoch are known in
advance, their outputs can be computed once per example (and per augmented view) and read
back for every epoch: the distill step then costs about as much as training the student
alone (`make_distill_step(student_apply, None, tx)` reads `batch["teacher_logits"]`).

What is stored (numpy ``.npy`` files next to the run, written row by row with `os.pwrite`
so the build streams, and read back through `numpy` memory maps):

* **full logits** (`top_k=None`): the teachers' logits `[K, C]` per example-view, in
  `dtype` (float32 round-trips exactly; float16 halves the size). Reconstruction is the
  identity.
* **top-k** (`top_k=k`): per teacher, the k largest **log-probabilities at T = 1**
  (`log_softmax(z)`, in `dtype`, default float16), their class indices (int16 when
  C <= 32767, else int32) and the log of the mass outside the top-k,
  :math:`\log(1 - \sum_{top k} p)` (computed from the logits in float32, so it stays
  accurate when that mass is tiny). Log-probabilities rather than raw logits because the
  largest is close to 0, where float16 is most precise.

A top-k entry is turned back into logits `[K, B, C]` in one of two ways (`fill`):

* ``"uniform"`` (default): the mass the teacher put outside its top-k at T = 1 is spread
  evenly over the other C - k classes: each gets the logit
  :math:`\log((1 - \sum_{top k} p) / (C - k))` (floored at `TOP_K_FILL`). At T = 1 this is
  the teacher's distribution with its tail flattened (top-k probabilities exact); at T it
  is that distribution tempered, :math:`\tilde p_c \propto p_c^{1/T}` in the top-k and
  :math:`((1 - \sum_{top k} p)/(C-k))^{1/T}` elsewhere. It keeps the tail's total mass, which
  tempering makes large (at T = 4, a teacher with 90% on one of 10 classes and the rest
  spread evenly puts 75% of its tempered mass on the other nine), so the target stays close
  to the online one.
* ``"renormalize"``: the top-k classes keep their stored log-probabilities and
  every other class gets `TOP_K_FILL` (-1e4). `softmax_t(z, temperature=T)` of that is
  exactly the teacher's distribution at temperature T **restricted to its top-k classes and
  renormalised**, :math:`\tilde p_c \propto p_c^{1/T}` for c in the top-k and 0 elsewhere
  (0 exactly in float32 for any T < 96, where :math:`e^{-10^4/T}` underflows). Being
  renormalised after tempering, it does not depend on the T used at build time: one cache
  serves every temperature.
  A much sharper target than the tempered teacher: on MNIST-1D (`benchmarks/cache_bench.py`)
  it cost students 0.5-1.9 accuracy points against online targets (mean of 5 seeds, for
  k = 1, 2, 3, 5), where ``"uniform"`` matched or beat them (+0.4 to +2.3).

Weightings that read the T = 1 logits (``"confidence"``, CA-MKD) see the reconstructed
logits: with ``"renormalize"`` a teacher whose top-k misses the true label has a
cross-entropy of about :math:`10^4` there, so it gets the smallest weight
(:math:`w_k = (1 - \mathrm{softmax}_k(ce)) / (K - 1)`) instead of a merely smaller one.

Augmented training: a fixed number of views per example (`num_views`), each with its own
cached output; batches carry `"view"` next to `"index"`, and the view's input must be
reproducible from `(index, view)` (`augment_view` derives a per-example key from both).

Multi-host: each process builds its own shard (`shard="p0"`, ...) over the examples it sees;
`open_cache` reads every shard in the directory, so a process can look up any example
another process cached (a shared file system is assumed). A shard is a full-size sparse
file written only at the rows its process saw.
"""

from __future__ import annotations

import glob
import json
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TOP_K_FILL",
    "FILLS",
    "TopK",
    "TeacherCache",
    "build_cache",
    "open_cache",
    "expand_top_k",
    "with_cached_logits",
    "augment_view",
]

_FORMAT = "mtkd_jax.cache/1"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.]*$")

TOP_K_FILL = -1.0e4
"""Logit given to classes outside a teacher's top-k (finite, so every loss stays finite)."""

FILLS = ("renormalize", "uniform")
"""Ways to fill the classes outside the top-k when a top-k entry is read back."""


class TopK(NamedTuple):
    """Compact top-k teacher outputs, teacher axis first.

    Attributes:
      log_probs: `[K, B, k]` log-probabilities at T = 1, descending (stored dtype).
      classes: `[K, B, k]` their class indices (int16 or int32).
      log_rest: `[K, B]` log of the probability outside the top-k (stored dtype).
    """

    log_probs: np.ndarray
    classes: np.ndarray
    log_rest: np.ndarray


# ---------------------------------------------------------------------------------------------
# Reconstruction


def _other_logit(xp, log_probs, log_rest, num_classes: int, fill: str):
    """`[..., 1]` float32 logit of the classes outside the top-k."""
    k = log_probs.shape[-1]
    if fill == "uniform" and k < num_classes:
        other = log_rest.astype(xp.float32)[..., None] - np.float32(np.log(num_classes - k))
        return xp.maximum(other, np.float32(TOP_K_FILL))
    return xp.full(log_probs.shape[:-1] + (1,), TOP_K_FILL, xp.float32)


def _expand_np(top: TopK, num_classes: int, fill: str) -> np.ndarray:
    """Host version of `expand_top_k` (a scatter; numpy)."""
    log_probs = np.asarray(top.log_probs, np.float32)
    other = _other_logit(np, log_probs, np.asarray(top.log_rest), num_classes, fill)
    out = np.broadcast_to(other, log_probs.shape[:-1] + (num_classes,)).copy()
    np.put_along_axis(out, np.asarray(top.classes, np.intp), log_probs, axis=-1)
    return out


def expand_top_k(
    log_probs: jax.Array,
    classes: jax.Array,
    log_rest: jax.Array | None = None,
    *,
    num_classes: int,
    fill: str = "uniform",
) -> jax.Array:
    """Top-k log-probabilities and class indices -> full logits `[..., C]`, jit-safe.

    The same reconstruction as `TeacherCache.lookup` (see the module docstring), for a step
    that receives the compact arrays of `TeacherCache.lookup_top_k` and expands them on the
    accelerator, moving about k/C of the bytes from the host.

    Args:
      log_probs: `[..., k]` log-probabilities at T = 1 (any float dtype).
      classes: `[..., k]` distinct class indices in `[0, C)`.
      log_rest: `[...]` log of the probability outside the top-k; needed for
        ``fill="uniform"`` (the default) only.
      num_classes: C.
      fill: ``"renormalize"`` or ``"uniform"``.

    Returns:
      `[..., C]` float32 logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.cache import expand_top_k
      >>> lp, cls = jnp.log(jnp.array([0.6, 0.2])), jnp.array([2, 0])
      >>> z = expand_top_k(lp, cls, jnp.log(0.2), num_classes=4)  # fill="uniform"
      >>> [round(v, 3) for v in jax.nn.softmax(z).tolist()]
      [0.2, 0.1, 0.6, 0.1]
      >>> z = expand_top_k(lp, cls, num_classes=4, fill="renormalize")
      >>> [round(v, 3) for v in jax.nn.softmax(z).tolist()]
      [0.25, 0.0, 0.75, 0.0]
    """
    _check_fill(fill)
    if jnp.shape(log_probs) != jnp.shape(classes):
        raise ValueError(
            f"`log_probs` {jnp.shape(log_probs)} and `classes` {jnp.shape(classes)} must have "
            "the same shape [..., k]."
        )
    _check_top_k(jnp.shape(log_probs)[-1], num_classes)
    if fill == "uniform":
        if log_rest is None or jnp.shape(log_rest) != jnp.shape(log_probs)[:-1]:
            got = None if log_rest is None else jnp.shape(log_rest)
            raise ValueError(
                f"`fill`='uniform' needs `log_rest` of shape {jnp.shape(log_probs)[:-1]} (the "
                f"batch shape of `log_probs`), got {got}."
            )
        log_rest = jnp.asarray(log_rest)
    log_probs = jnp.asarray(log_probs, jnp.float32)
    other = _other_logit(jnp, log_probs, log_rest, num_classes, fill)
    # A one-hot select rather than a scatter: dense and vectorised on every backend.
    onehot = jnp.asarray(classes)[..., None] == jnp.arange(num_classes)  # [..., k, C]
    values = jnp.sum(jnp.where(onehot, log_probs[..., None], 0.0), axis=-2)
    return jnp.where(jnp.any(onehot, axis=-2), values, other)


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_fill(fill) -> None:
    if fill not in FILLS:
        raise ValueError(f"`fill` must be one of {FILLS}, got {fill!r}.")


def _check_top_k(top_k, num_classes: int) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"`top_k` must be None or an integer in [1, C], got {top_k!r}.")
    if not 1 <= top_k <= num_classes:
        raise ValueError(
            f"`top_k` must be in [1, C={num_classes}] (the number of classes), got {top_k}."
        )


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _suffix(shard) -> str:
    if shard is None:
        return ""
    shard = str(shard)
    if not shard or not _SHARD_RE.match(shard):
        raise ValueError(
            f"`shard` must be None or a non-empty name of letters, digits, '_' and '.', got "
            f"{shard!r}."
        )
    return f"-{shard}"


def _sha(fingerprint) -> str | None:
    if fingerprint is None:
        return None
    if isinstance(fingerprint, dict):
        return fingerprint.get("sha256")
    if isinstance(fingerprint, str):
        return fingerprint
    raise TypeError(
        "`expect_fingerprint` must be a fingerprint dict (from `teacher_fingerprint`) or its "
        f"sha256 string, got {type(fingerprint).__name__}."
    )


# ---------------------------------------------------------------------------------------------
# Row-wise writer: no memory map while building, so resident memory does not grow with the
# file (dirty pages of a writable map count in the process's RSS until the kernel flushes them).


class _RowFile:
    """A preallocated `.npy` file `[V, N, *row]` written one row (or run of rows) at a time."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            self.offset = f.tell()
            self.row_bytes = int(np.prod(shape[2:], dtype=np.int64)) * self.dtype.itemsize
            f.truncate(self.offset + int(np.prod(shape[:2], dtype=np.int64)) * self.row_bytes)
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, rows: np.ndarray, order: np.ndarray, flat: np.ndarray) -> None:
        """Write `rows[order]` at the sorted flat row numbers `flat`, one pwrite per run."""
        rows = np.ascontiguousarray(rows[order], dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(flat) != 1) + 1
        for run in np.split(np.arange(len(flat)), breaks):
            os.pwrite(
                self.fd,
                rows[run[0] : run[-1] + 1].tobytes(),
                self.offset + int(flat[run[0]]) * self.row_bytes,
            )

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# Reader


class TeacherCache:
    """Cached teacher outputs, read back per batch. Built by `build_cache`, or `open_cache`.

    Attributes:
      path: the cache directory.
      header: the JSON header of the first shard (kind, sizes, dtype, fingerprint, meta).
      num_examples, num_views, num_teachers, num_classes: N, V, K, C.
      top_k: k, or None for full logits.
      fill: how top-k entries are reconstructed (``"renormalize"`` or ``"uniform"``).
      shards: names of the shards read ("" for an unsharded cache).
    """

    def __init__(self, path: str, headers: dict[str, dict], *, fill: str = "uniform"):
        _check_fill(fill)
        self.path, self.fill = path, fill
        self.shards = sorted(headers)
        h = self.header = headers[self.shards[0]]
        self.num_examples, self.num_views = h["num_examples"], h["num_views"]
        self.num_teachers, self.num_classes = h["num_teachers"], h["num_classes"]
        self.top_k = h["top_k"]
        self._values, self._classes, self._rest, self._written = [], [], [], []
        for shard in self.shards:
            s = _suffix(shard or None)
            self._values.append(np.load(os.path.join(path, f"values{s}.npy"), mmap_mode="r"))
            self._written.append(np.load(os.path.join(path, f"written{s}.npy"), mmap_mode="r"))
            if self.top_k is not None:
                for name, arrays in (("classes", self._classes), ("rest", self._rest)):
                    file = os.path.join(path, f"{name}{s}.npy")
                    arrays.append(np.load(file, mmap_mode="r"))
        # With several shards, which one holds each (view, example): -1 where none does.
        self._owner = None
        if len(self.shards) > 1:
            owner = np.full((self.num_views, self.num_examples), -1, np.int16)
            for i, written in enumerate(self._written):
                owner[(owner < 0) & (np.asarray(written) > 0)] = i
            self._owner = owner

    def __repr__(self) -> str:
        kind = "logits" if self.top_k is None else f"top_k={self.top_k}"
        return (
            f"TeacherCache({self.path!r}, N={self.num_examples}, views={self.num_views}, "
            f"K={self.num_teachers}, C={self.num_classes}, {kind}, "
            f"dtype={self.header['dtype']}, shards={len(self.shards)})"
        )

    @property
    def bytes_per_example(self) -> int:
        """Bytes stored per example and view (values, indices, remainder, written flag)."""
        h = self.header
        width = self.num_classes if self.top_k is None else self.top_k
        n = self.num_teachers * width * np.dtype(h["dtype"]).itemsize
        if self.top_k is not None:
            n += self.num_teachers * self.top_k * np.dtype(h["index_dtype"]).itemsize
            n += self.num_teachers * np.dtype(h["dtype"]).itemsize  # log_rest
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
        view = np.broadcast_to(np.asarray(view), index.shape)
        if not np.issubdtype(view.dtype, np.integer) or (
            view.size and (view.min() < 0 or view.max() >= self.num_views)
        ):
            raise ValueError(
                f"`view` must be integers in [0, {self.num_views}) with the shape of `index` "
                f"{index.shape}, got {view.dtype}{list(np.shape(view))}."
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
        return TopK(np.swapaxes(values, 0, 1), np.swapaxes(classes, 0, 1), rest.T)

    def lookup(self, index, view=None) -> np.ndarray:
        """Teacher logits `[K, B, C]` float32 for a batch's examples, ready for the distill step.

        Args:
          index: `[B]` example indices (a batch's `"index"`).
          view: the augmented view of each example, a scalar or `[B]` ints (a batch's
            `"view"`); may be omitted when the cache holds one view.

        Returns:
          `[K, B, C]` float32: the stored logits, or the reconstructed top-k logits (module
          docstring).

        Raises:
          ValueError: an index or view out of range, or an entry that was never written.
        """
        if self.top_k is not None:
            return _expand_np(self.lookup_top_k(index, view), self.num_classes, self.fill)
        index, view = self._rows(index, view)
        return np.swapaxes(self._gather(self._values, index, view), 0, 1).astype(np.float32)


def _read_headers(path: str, shards) -> dict[str, dict]:
    found = {}
    for file in sorted(glob.glob(os.path.join(path, "cache*.json"))):
        name = os.path.basename(file)[len("cache") : -len(".json")]
        found[name[1:] if name.startswith("-") else name] = file
    if shards is not None:
        wanted = [str(s) if s is not None else "" for s in shards]
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise FileNotFoundError(
                f"No cache shard(s) {missing} in {path}; found {sorted(found)}."
            )
        found = {s: found[s] for s in wanted}
    if not found:
        raise FileNotFoundError(
            f"No teacher cache in {path} (no cache*.json header: never built, or the build "
            "did not finish)."
        )
    headers = {}
    for shard, file in found.items():
        with open(file) as f:
            headers[shard] = json.load(f)
        if headers[shard].get("format") != _FORMAT:
            raise ValueError(f"{file} is not a teacher cache header (format {_FORMAT!r}).")
    keys = ("num_examples", "num_views", "num_teachers", "num_classes", "top_k", "dtype")
    first = next(iter(headers.values()))
    for shard, h in headers.items():
        differ = [k for k in keys if h[k] != first[k]]
        if differ or _sha(h["fingerprint"]) != _sha(first["fingerprint"]):
            raise ValueError(
                f"Cache shard {shard!r} in {path} disagrees with the others on "
                f"{differ or ['fingerprint']}; rebuild the cache."
            )
    return headers


def open_cache(
    path: str | os.PathLike,
    *,
    expect_fingerprint: dict | str | None = None,
    fill: str = "uniform",
    shards: Iterable[str] | None = None,
) -> TeacherCache:
    """Open a cache written by `build_cache` (every shard in `path`, or only `shards`).

    Args:
      path: the cache directory.
      expect_fingerprint: the teachers the caller distills from (`teacher_fingerprint(tp)`,
        or its sha256); a cache built from other teachers is refused.
      fill: reconstruction of top-k entries, ``"renormalize"`` or ``"uniform"``.
      shards: shard names to read (default all).

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
    _check_fill(fill)
    path = os.path.abspath(os.fspath(path))
    headers = _read_headers(path, shards)
    want = _sha(expect_fingerprint)
    have = _sha(next(iter(headers.values()))["fingerprint"])
    if want is not None and want != have:
        raise ValueError(
            f"The cache in {path} was built from other teachers (fingerprint sha256 {have}, "
            f"expected {want}); rebuild it with `build_cache` for these teachers."
        )
    return TeacherCache(path, headers, fill=fill)


# ---------------------------------------------------------------------------------------------
# Builder


def _batch_rows(batch, num_examples: int, num_views: int):
    if not isinstance(batch, dict) or "x" not in batch or "index" not in batch:
        raise ValueError(
            "each batch must be a dict with 'x' [B, ...] and 'index' [B] (and 'view' [B] when "
            f"num_views > 1); got {sorted(batch) if isinstance(batch, dict) else type(batch)}."
        )
    index = np.asarray(batch["index"])
    b = np.shape(batch["x"])[0]
    if index.shape != (b,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(
            f"batch['index'] must be [B]=({b},) integers, got {index.dtype}{list(index.shape)}."
        )
    if b and (index.min() < 0 or index.max() >= num_examples):
        raise ValueError(
            f"batch['index'] values must be in [0, num_examples={num_examples}), got range "
            f"[{index.min()}, {index.max()}]."
        )
    if "view" in batch:
        view = np.broadcast_to(np.asarray(batch["view"]), (b,))
    elif num_views == 1:
        view = np.zeros((b,), np.int64)
    else:
        raise ValueError(f"num_views={num_views}, so each batch needs 'view' [B] ints.")
    if b and (
        not np.issubdtype(view.dtype, np.integer) or view.min() < 0 or view.max() >= num_views
    ):
        raise ValueError(f"batch['view'] must be integers in [0, {num_views}), got {view}.")
    return index.astype(np.int64), view.astype(np.int64)


def build_cache(
    path: str | os.PathLike,
    teacher_apply: Callable[[Any, jax.Array], jax.Array],
    teacher_params: Any,
    batches: Iterable[dict],
    *,
    num_examples: int,
    num_views: int = 1,
    top_k: int | None = None,
    dtype=np.float16,
    shard: str | None = None,
    fingerprint: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TeacherCache:
    """Run the teachers once over `batches` and store their outputs by example index.

    Streams: one batch is computed while the previous one is written with `os.pwrite` at
    its rows, so memory does not grow with the dataset (at most two batches are held). The
    header `cache{-shard}.json` is written last, so an interrupted build leaves no readable
    cache.

    Args:
      path: directory for the files (created if needed).
      teacher_apply: `(teacher_params, x [B, ...]) -> logits [K, B, C]`, e.g. from
        `mtkd_jax.teachers.make_stacked_apply`.
      teacher_params: its params.
      batches: iterable of `{"x": [B, ...], "index": [B] ints in [0, num_examples),
        "view": [B] ints in [0, num_views) (when num_views > 1)}` (other keys are ignored);
        `x` must be the (augmented) input the student will see for that (index, view).
      num_examples: N, the size of the split the indices refer to.
      num_views: V, cached views per example (1 without augmentation).
      top_k: None to store full logits, or k in [1, C] to store top-k log-probabilities.
      dtype: storage dtype of the values (float16 or float32; bfloat16 is not a numpy type).
      shard: this process's shard name for multi-host builds (e.g. `f"p{jax.process_index()}"`).
      fingerprint: identity of the teachers; default `teacher_fingerprint(teacher_params)`.
      meta: JSON-serialisable notes kept in the header (dataset, split, augmentation seed).
      overwrite: replace an existing cache (shard) in `path`.
      progress: show a progress bar (tqdm) on stderr.

    Returns:
      The `TeacherCache` of this shard. Its header records `build_seconds` and `num_written`.

    Example: see `open_cache`.
    """
    num_examples = _positive_int(num_examples, "num_examples")
    num_views = _positive_int(num_views, "num_views")
    if top_k is not None:
        _check_top_k(top_k, np.iinfo(np.int32).max)  # the type now, the range vs C later
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"`dtype` must be float16 or float32, got {dtype}.")
    suffix = _suffix(shard)
    if meta is not None:
        json.dumps(meta)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    header_path = os.path.join(path, f"cache{suffix}.json")
    if os.path.exists(header_path):
        if not overwrite:
            raise ValueError(f"A cache already exists at {header_path}; pass overwrite=True.")
        os.remove(header_path)
    if fingerprint is None:
        from mtkd_jax.teachers import teacher_fingerprint

        fingerprint = teacher_fingerprint(teacher_params)

    start = time.perf_counter()

    def post(z):
        z = z.astype(jnp.float32)
        if top_k is None:
            return z, None, None
        log_probs, classes = jax.lax.top_k(jax.nn.log_softmax(z, axis=-1), top_k)
        # The remainder from the logits, not as 1 - sum(top-k): no cancellation when tiny.
        in_top = jnp.any(classes[..., None] == jnp.arange(z.shape[-1]), axis=-2)
        log_rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, z), axis=-1)
        log_rest = jnp.maximum(log_rest - jax.nn.logsumexp(z, axis=-1), TOP_K_FILL)
        return log_probs, classes, log_rest

    run = jax.jit(lambda tp, x: post(teacher_apply(tp, x)))
    files: dict[str, _RowFile] = {}
    sizes: dict[str, Any] = {"written": 0}

    def open_files(x) -> None:
        shape = jax.eval_shape(teacher_apply, teacher_params, x).shape
        if len(shape) != 3:
            raise ValueError(f"`teacher_apply` must return logits [K, B, C], got {shape}.")
        k, c = shape[0], shape[2]
        _check_top_k(top_k, c)
        index_dtype = np.int16 if c <= np.iinfo(np.int16).max else np.int32
        rows = (num_views, num_examples, k, c if top_k is None else top_k)
        files["values"] = _RowFile(os.path.join(path, f"values{suffix}.npy"), rows, dtype)
        if top_k is not None:
            files["classes"] = _RowFile(
                os.path.join(path, f"classes{suffix}.npy"), rows, index_dtype
            )
            files["rest"] = _RowFile(os.path.join(path, f"rest{suffix}.npy"), rows[:3], dtype)
        files["written"] = _RowFile(
            os.path.join(path, f"written{suffix}.npy"), (num_views, num_examples), np.uint8
        )
        sizes.update(k=k, c=c, index_dtype=np.dtype(index_dtype).name)

    def write(pending) -> None:
        (vals, cls, rest), index, view = pending
        vals, cls, rest = jax.device_get((vals, cls, rest))
        if vals.shape[0] != sizes["k"]:
            raise ValueError(
                f"`teacher_apply` gave K={vals.shape[0]} teachers, earlier K={sizes['k']}."
            )
        flat = view * num_examples + index
        order = np.argsort(flat, kind="stable")
        flat = flat[order]
        files["values"].write(np.swapaxes(vals, 0, 1), order, flat)  # [B, K, W]
        if cls is not None:
            files["classes"].write(np.swapaxes(cls, 0, 1), order, flat)
            files["rest"].write(rest.T, order, flat)  # [B, K]
        files["written"].write(np.ones(len(flat), np.uint8), order, flat)
        sizes["written"] += len(flat)

    iterator: Iterable[dict] = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="teacher cache", unit="batch")
    pending = None
    try:
        for batch in iterator:
            index, view = _batch_rows(batch, num_examples, num_views)
            if not files:
                open_files(batch["x"])
            # Dispatched asynchronously: the teachers run while the previous batch is written.
            out = run(teacher_params, batch["x"])
            if pending is not None:
                write(pending)
            pending = (out, index, view)
        if pending is not None:
            write(pending)
    finally:
        for f in files.values():
            f.close()
    if not files:
        raise ValueError("`batches` is empty: nothing to cache.")

    header = {
        "format": _FORMAT,
        "kind": "logits" if top_k is None else "top_k_log_probs",
        "top_k": top_k,
        "num_examples": num_examples,
        "num_views": num_views,
        "num_teachers": sizes["k"],
        "num_classes": sizes["c"],
        "dtype": dtype.name,
        "index_dtype": sizes["index_dtype"] if top_k is not None else None,
        "shard": shard,
        "fingerprint": fingerprint,
        "num_written": sizes["written"],
        "build_seconds": time.perf_counter() - start,
        "meta": meta or {},
    }
    tmp = header_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1)
    os.replace(tmp, header_path)
    return open_cache(path, shards=[shard or ""])


# ---------------------------------------------------------------------------------------------
# Feeding the distill step


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
        yield {**batch, key: cache.lookup(batch["index"], batch.get("view"))}


def augment_view(
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array],
    key: jax.Array,
    x: jax.Array,
    index: jax.Array,
    view: jax.Array | int,
) -> jax.Array:
    """View `view` of each example, reproducible from `(key, index, view)` alone.

    Example i gets `augment_fn(fold_in(fold_in(key, index[i]), view[i]), x[i:i+1])`, so the
    cache build and every later epoch see the same input for the same (index, view),
    whatever the batch composition. Jit-safe.

    Args:
      augment_fn: `(key, x [1, ...]) -> [1, ...]`, e.g. `mtkd_jax.data.augment`.
      key: a PRNG key fixed for the run.
      x: `[B, ...]` inputs.
      index: `[B]` example indices.
      view: a scalar or `[B]` view numbers.

    Returns:
      `[B, ...]` augmented inputs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.cache import augment_view
      >>> noise = lambda k, x: x + jax.random.normal(k, x.shape)
      >>> x = jnp.zeros((3, 2))
      >>> a = augment_view(noise, jax.random.key(0), x, jnp.array([5, 6, 7]), 1)
      >>> b = augment_view(noise, jax.random.key(0), x[1:], jnp.array([6, 7]), 1)
      >>> bool(jnp.all(a[1:] == b))
      True
    """
    index = jnp.asarray(index)
    view = jnp.broadcast_to(jnp.asarray(view), index.shape)

    def one(i, v, xi):
        k = jax.random.fold_in(jax.random.fold_in(key, i), v)
        return augment_fn(k, xi[None])[0]

    return jax.vmap(one)(index, view, x)
