"""Building one cache from several processes, each caching its own batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import jax

from mtkd_jax.cache.reader import TeacherCache, open_cache
from mtkd_jax.cache.topk import DEFAULT_FILL, check_fill
from mtkd_jax.cache.writer import build_cache
from mtkd_jax.parallel import barrier, is_main_process, mesh_of, process_local

__all__ = ["build_cache_in_parallel"]


def _check_replicated(teacher_params: Any) -> None:
    """Refuse teacher params split over devices: each process must hold a whole copy."""
    for leaf in jax.tree.leaves(teacher_params):
        if (
            isinstance(leaf, jax.Array)
            and not leaf.is_fully_addressable
            and not leaf.is_fully_replicated
        ):
            raise ValueError(
                "`teacher_params` must be host arrays or replicated over the mesh; got a "
                f"leaf split over devices with sharding {leaf.sharding}."
            )


def build_cache_in_parallel(
    path: str | os.PathLike,
    teacher_apply: Callable[[Any, jax.Array], jax.Array],
    teacher_params: Any,
    local_batches: Iterable[dict],
    *,
    num_examples: int,
    fill: str = DEFAULT_FILL,
    progress: bool = True,
    teacher_shardings: Any = None,
    **build_kwargs,
) -> TeacherCache:
    """Build a teacher-output cache with every process caching its own batches, then open it.

    Process p runs the teachers on its `local_batches` only (no communication) and writes
    them as shard `"p<p>"` of the cache in `path` (`build_cache`); all then wait for each
    other and open the shards of this job together, so each can look up any example,
    whichever process cached it. `path` must be on a file system all processes share. For
    the cache to cover the split, the processes' batches together must visit every example
    (and view), e.g. `mtkd_jax.data.batches(..., shuffle=False, drop_remainder=False)` with
    its default per-process slicing.

    Args:
      path: the cache directory, the same on every process.
      teacher_apply: `(teacher_params, x [B, ...]) -> logits [K, B, C]`.
      teacher_params: host arrays, or arrays replicated over the devices of all processes
        (each process then runs the teachers on its own copy,
        `mtkd_jax.parallel.process_local`).
      local_batches: this process's `{"x", "index"(, "view")}` batches.
      num_examples: N, the size of the split the indices refer to.
      fill: reconstruction of top-k entries when reading (`DEFAULT_FILL`; see `open_cache`).
      progress: show a progress bar, on process 0 only.
      teacher_shardings: None, or shardings of `teacher_params` over a mesh of this
        process's own devices (`mtkd_jax.parallel.tree_shardings` on
        `make_mesh(..., devices=jax.local_devices())`): each process then holds one copy of
        the teachers split over its devices (see `build_cache`).
      **build_kwargs: `num_views`, `top_k`, `keep_labels`, `tail_samples`, `key`, `dtype`,
        `fingerprint`, `meta`, `overwrite` of `build_cache` (with `tail_samples`, pass the
        same `key` on every process: each example draws with its own key folded from it, so
        the cache is the one a single process would build).

    Returns:
      The `TeacherCache` over the shards `p0 ... p<P-1>`.

    Raises:
      ValueError: teacher params split over devices (not replicated); `shard` given (it is
        this process's index); a bad `fill`; any error of `build_cache` or `open_cache`.

    Example:
      >>> import tempfile, numpy as np, jax.numpy as jnp
      >>> from mtkd_jax.cache import build_cache_in_parallel
      >>> apply = lambda tp, x: jnp.stack([x @ tp, 2 * x @ tp])           # K=2 teachers
      >>> batch = {"x": np.eye(3, dtype=np.float32), "index": np.arange(3)}
      >>> cache = build_cache_in_parallel(tempfile.mkdtemp(), apply, np.eye(3), [batch],
      ...                                 num_examples=3, dtype=np.float32, progress=False)
      >>> cache.shards, cache.lookup(np.array([1]))[:, 0].tolist()
      (['p0'], [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    """
    if "shard" in build_kwargs:
        raise ValueError("`shard` is set by build_cache_in_parallel: 'p<process index>'.")
    check_fill(fill)  # before the build, not after it
    _check_replicated(teacher_params)
    if teacher_shardings is not None:
        local = set(jax.local_devices())
        if not set(mesh_of(teacher_shardings, "teacher_shardings").devices.flat) <= local:
            raise ValueError(
                "`teacher_shardings` must lie on this process's own devices (a mesh over "
                "`jax.local_devices()`): every process caches its batches on its own."
            )
        build_kwargs["teacher_shardings"] = teacher_shardings
    count = jax.process_count()
    build_cache(
        path,
        teacher_apply,
        process_local(teacher_params),
        local_batches,
        num_examples=num_examples,
        shard=f"p{jax.process_index()}",
        progress=progress and is_main_process(),
        **build_kwargs,
    )
    barrier("mtkd_jax.cache.build_cache_in_parallel")
    return open_cache(path, fill=fill, shards=[f"p{p}" for p in range(count)])
