"""Building a teacher cache: run the teachers once over the batches and store their outputs."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax.cache.format import FORMAT, create_row_files, header_file, index_dtype, write_header
from mtkd_jax.cache.reader import TeacherCache, open_cache
from mtkd_jax.cache.topk import check_tail_samples, check_top_k, top_k_of_logits
from mtkd_jax.core import checks as _checks
from mtkd_jax.parallel import mesh_of, place
from mtkd_jax.training.checkpoint import params_fingerprint

__all__ = ["build_cache"]


def _batch_labels(batch, sizes: dict) -> np.ndarray:
    """`batch["y"]` as int32 `[B]` (or `[B, L]` for a sequence cache), for `keep_labels`."""
    b = _checks.batch_size(batch["x"], "batch['x']")
    want = (b,) if sizes["seq_len"] is None else (b, sizes["seq_len"])
    y = batch.get("y")
    if y is None or np.shape(y) != want or not np.issubdtype(np.asarray(y).dtype, np.integer):
        got = None if y is None else f"{np.asarray(y).dtype}{list(np.shape(y))}"
        raise ValueError(f"`keep_labels=True` needs batch['y'] of integer labels {list(want)} "
                         f"in every batch, got {got}.")
    return np.asarray(y, np.int32)


def _batch_rows(batch, num_examples: int, num_views: int):
    """A batch's `(index, view)` as int64 `[B]` arrays, checked against the cache's sizes."""
    if not isinstance(batch, dict) or "x" not in batch or "index" not in batch:
        raise ValueError(
            "each batch must be a dict with 'x' [B, ...] and 'index' [B] (and 'view' [B] when "
            f"num_views > 1); got {sorted(batch) if isinstance(batch, dict) else type(batch)}."
        )
    b = _checks.batch_size(batch["x"], "batch['x']")
    if b == 0:
        raise ValueError(
            f"batch['x'] must be a non-empty batch [B, ...] with B >= 1, got shape "
            f"{_checks.shapes(batch['x'])}."
        )
    index = np.asarray(batch["index"])
    if index.shape != (b,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(
            f"batch['index'] must be [B]=({b},) integers, got {index.dtype}{list(index.shape)}."
        )
    if index.min() < 0 or index.max() >= num_examples:
        raise ValueError(
            f"batch['index'] values must be in [0, num_examples={num_examples}), got range "
            f"[{index.min()}, {index.max()}]."
        )
    if "view" in batch:
        given = np.asarray(batch["view"])
        if given.shape not in ((), (1,), (b,)):
            raise ValueError(
                f"batch['view'] must be a scalar or [B]=({b},) integers, got shape "
                f"{list(given.shape)}."
            )
        view = np.broadcast_to(given, (b,))
    elif num_views == 1:
        view = np.zeros((b,), np.int64)
    else:
        raise ValueError(f"num_views={num_views}, so each batch needs 'view' [B] ints.")
    if not np.issubdtype(view.dtype, np.integer) or view.min() < 0 or view.max() >= num_views:
        raise ValueError(f"batch['view'] must be integers in [0, {num_views}), got {view}.")
    return index.astype(np.int64), view.astype(np.int64)


def _stored(values: np.ndarray, dtype: np.dtype, index: np.ndarray) -> np.ndarray:
    """`values [K, B, ...]` float32 cast to the storage dtype; refuses NaN, inf and overflow."""
    bad = ~np.isfinite(values).reshape(values.shape[0], values.shape[1], -1).all(axis=(0, 2))
    if bad.any():
        raise ValueError(
            f"`teacher_apply` gave NaN or inf logits for {int(bad.sum())} example(s) (first "
            f"batch['index'] values {index[bad][:5].tolist()}); the cache stores finite "
            "teacher outputs only: check `teacher_params` and the inputs."
        )
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if not np.all(np.isfinite(out)):
        raise ValueError(
            f"The teachers' outputs (largest magnitude {np.abs(values).max():.4g}) overflow "
            f"`dtype`={dtype.name} (finite up to {np.finfo(dtype).max:.4g}); pass "
            "dtype=np.float32."
        )
    return out


def build_cache(
    path: str | os.PathLike,
    teacher_apply: Callable[[Any, jax.Array], jax.Array],
    teacher_params: Any,
    batches: Iterable[dict],
    *,
    num_examples: int,
    num_views: int = 1,
    top_k: int | None = None,
    keep_labels: bool = False,
    tail_samples: int = 0,
    key: jax.Array | None = None,
    dtype=np.float16,
    shard: str | None = None,
    fingerprint: dict | None = None,
    meta: dict | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    teacher_shardings: Any = None,
) -> TeacherCache:
    """Run the teachers once over `batches` and store their outputs by example index.

    Streams: one batch is computed while the previous one is written with `os.pwrite` at
    its rows, so memory does not grow with the dataset (at most two batches are held). The
    header `cache{-shard}.json` is written last, so an interrupted build leaves no readable
    cache. The layout is described in `mtkd_jax.cache.format`, the top-k entries in
    `mtkd_jax.cache.topk`.

    Args:
      path: directory for the files (created if needed).
      teacher_apply: `(teacher_params, x [B, ...]) -> logits [K, B, C]`, e.g. from
        `mtkd_jax.teachers.make_stacked_apply`, or `[K, B, L, V]` for sequences (a token
        cache: `[N, L, k]` top-k entries per teacher). The logits must be finite (padding
        positions included: they are stored and ignored by the steps' masks).
      teacher_params: its params.
      batches: iterable of `{"x": [B, ...] with B >= 1, "index": [B] ints in
        [0, num_examples), "view": [B] ints in [0, num_views) (when num_views > 1)}` (other
        keys are ignored); `x` must be the (augmented) input the student will see for that
        (index, view).
      num_examples: N, the size of the split the indices refer to.
      num_views: V, cached views per example (1 without augmentation).
      top_k: None to store full logits, or k in [1, C] to store top-k log-probabilities.
      keep_labels: with `top_k`, each entry also holds the label's log-probability (every
        batch then needs `"y"`, `[B]` or `[B, L]`): where the label is not among the k
        largest it takes the k-th slot (`top_k_of_logits(keep=...)`), so the stored bytes
        do not change and the weightings that read the label's probability (``confidence``,
        ``posterior``) get from the cache exactly what they get online.
      tail_samples: with `top_k`, m more slots per entry that hold a sample of the teacher's
        distribution outside its top-k (`top_k_of_logits(tail_samples=m)`: m systematic
        draws, the drawn classes with their estimated probabilities): the k + m slots sum to
        1 and equal the teacher's distribution in expectation, where a top-k entry drops the
        tail. Each (view, example) draws with its own key, `fold_in(key, view * N +
        index)`, so the entry does not depend on how the examples are batched.
      key: PRNG key of those draws (required with `tail_samples`).
      dtype: storage dtype of the values (float16 or float32; bfloat16 is not a numpy type).
      shard: this process's shard name for multi-host builds (e.g. `f"p{jax.process_index()}"`).
      fingerprint: identity of the teachers (a JSON-serialisable dict); default
        `mtkd_jax.training.checkpoint.params_fingerprint(teacher_params)`.
      meta: JSON-serialisable notes kept in the header (dataset, split, augmentation seed).
      tokenizer: for a sequence cache, the fingerprint of the tokenization of the inputs
        (e.g. `mtkd_jax.data.text.vocab_fingerprint(vocab)`), checked by
        `open_cache(expect_tokenizer=...)`.
      overwrite: replace an existing cache (shard) in `path`.
      progress: show a progress bar (tqdm) on stderr.
      teacher_shardings: None, or `NamedSharding`s of `teacher_params` over one mesh
        (`mtkd_jax.parallel.tree_shardings`) for teachers that fit only when sharded: the
        params are placed so and the teachers run as one program over that mesh (each batch
        replicated on it).

    Returns:
      The `TeacherCache` of this shard. Its header records `build_seconds` and `num_written`.

    Raises:
      ValueError: a bad argument or batch (named in the message), an existing cache without
        `overwrite`, NaN or inf teacher outputs, outputs that overflow `dtype`, or no batches.

    Example: see `open_cache`.
    """
    num_examples = _checks.check_int(num_examples, "num_examples")
    num_views = _checks.check_int(num_views, "num_views")
    if top_k is not None:
        check_top_k(top_k, np.iinfo(np.int32).max)  # the type now, the range vs C later
    if not isinstance(keep_labels, bool):
        raise TypeError(f"`keep_labels` must be a bool, got {keep_labels!r}.")
    if keep_labels and top_k is None:
        raise ValueError("`keep_labels=True` is for top-k caches: pass `top_k` too.")
    check_tail_samples(tail_samples, top_k or 0, np.iinfo(np.int32).max)  # k + m vs C later
    if tail_samples and top_k is None:
        raise ValueError("`tail_samples` is for top-k caches: pass `top_k` too.")
    if tail_samples and key is None:
        raise ValueError("`tail_samples` > 0 draws classes: pass `key`, a PRNG key.")
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"`dtype` must be float16 or float32, got {dtype!r}.") from error
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"`dtype` must be float16 or float32, got {dtype}.")
    if isinstance(batches, dict):
        raise TypeError("`batches` must be an iterable of batch dicts, not one dict.")
    for value, name in ((meta, "meta"), (fingerprint, "fingerprint")):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`{name}` must be JSON-serialisable: {error}") from error
    path = os.path.abspath(os.fspath(path))
    header_path = header_file(path, shard)  # checks the shard name
    os.makedirs(path, exist_ok=True)
    if os.path.exists(header_path):
        if not overwrite:
            raise ValueError(f"A cache already exists at {header_path}; pass overwrite=True.")
        os.remove(header_path)
    if fingerprint is None:
        fingerprint = params_fingerprint(teacher_params)
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise TypeError(f"`tokenizer` must be a fingerprint string, got {type(tokenizer)}.")

    start = time.perf_counter()

    def post(z, y, rows):
        z = z.astype(jnp.float32)
        if top_k is None:
            return z, None, None
        if not tail_samples:
            return tuple(top_k_of_logits(z, top_k=top_k, keep=y))

        def one(z_b, y_b, row):  # one example: its own key, whatever the batch
            return top_k_of_logits(z_b, top_k=top_k, keep=y_b, tail_samples=tail_samples,
                                   key=jax.random.fold_in(key, row))

        in_y = None if y is None else 0
        return tuple(jax.vmap(one, in_axes=(1, in_y, 0), out_axes=1)(z, y, rows))

    if teacher_shardings is None:
        run = jax.jit(lambda tp, x, y, rows: post(teacher_apply(tp, x), y, rows))
    else:
        mesh = mesh_of(teacher_shardings, "teacher_shardings")
        teacher_params = place(teacher_params, teacher_shardings)
        replicated = NamedSharding(mesh, P())
        run = jax.jit(lambda tp, x, y, rows: post(teacher_apply(tp, x), y, rows),
                      in_shardings=(teacher_shardings, replicated, replicated, replicated))
    files = {}
    sizes: dict[str, Any] = {"written": 0, "x": None}

    def check_logits(x) -> None:
        """The logits' shape for this batch's `x` (again whenever the shape of `x` changes)."""
        signature = jax.tree.map(lambda a: (np.shape(a), jnp.result_type(a)), x)
        if sizes["x"] == signature:
            return
        sizes["x"] = signature
        shape = jax.eval_shape(teacher_apply, teacher_params, x).shape
        b = _checks.batch_size(x)
        if len(shape) not in (3, 4) or shape[1] != b:
            raise ValueError(
                f"`teacher_apply` must return logits [K, B, C] with B={b} (the "
                f"batch), or [K, B, L, V] for sequences, got {shape}."
            )
        seq_len = shape[2] if len(shape) == 4 else None
        if seq_len is None and tokenizer is not None:
            raise ValueError("`tokenizer` is for sequence caches ([K, B, L, V] logits).")
        if files and seq_len != sizes["seq_len"]:
            raise ValueError(
                f"`teacher_apply` gave sequences of length {seq_len}, earlier {sizes['seq_len']}:"
                " pad every batch to one length L."
            )
        shape = (shape[0], shape[1], shape[-1])
        if not files:
            check_top_k(top_k, shape[2])
            if top_k is not None:
                check_tail_samples(tail_samples, top_k, shape[2])
            sizes.update(k=shape[0], c=shape[2], seq_len=seq_len)
            files.update(
                create_row_files(
                    path,
                    shard,
                    num_views=num_views,
                    num_examples=num_examples,
                    num_teachers=shape[0],
                    num_classes=shape[2],
                    top_k=None if top_k is None else top_k + tail_samples,
                    dtype=dtype,
                    seq_len=seq_len,
                )
            )
        elif (shape[0], shape[2]) != (sizes["k"], sizes["c"]):
            raise ValueError(
                f"`teacher_apply` gave K={shape[0]} teachers and C={shape[2]} classes, earlier "
                f"K={sizes['k']} and C={sizes['c']}."
            )

    def write(pending) -> None:
        (vals, cls, rest), index, view = pending
        vals, cls, rest = jax.device_get((vals, cls, rest))
        vals = _stored(vals, dtype, index)
        flat = view * num_examples + index
        order = np.argsort(flat, kind="stable")
        flat = flat[order]
        files["values"].write(np.swapaxes(vals, 0, 1), order, flat)  # [B, K, (L,) W]
        if cls is not None:
            files["classes"].write(np.swapaxes(cls, 0, 1), order, flat)
            files["rest"].write(np.swapaxes(_stored(rest, dtype, index), 0, 1), order, flat)
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
            check_logits(batch["x"])
            labels = _batch_labels(batch, sizes) if keep_labels else None
            # Dispatched asynchronously: the teachers run while the previous batch is written.
            out = run(teacher_params, batch["x"], labels,
                      np.asarray(view * num_examples + index, np.int32))
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
        "format": FORMAT,
        "kind": "logits" if top_k is None else "top_k_log_probs",
        "top_k": top_k,
        "keeps_labels": keep_labels,
        "tail_samples": tail_samples,
        "num_examples": num_examples,
        "num_views": num_views,
        "num_teachers": sizes["k"],
        "num_classes": sizes["c"],
        "dtype": dtype.name,
        "index_dtype": index_dtype(sizes["c"]).name if top_k is not None else None,
        "shard": shard,
        "fingerprint": fingerprint,
        "num_written": sizes["written"],
        "build_seconds": time.perf_counter() - start,
        "meta": meta or {},
        "seq_len": sizes["seq_len"],
        "tokenizer": tokenizer,
    }
    write_header(path, shard, header)
    return open_cache(path, shards=[shard or ""])
