"""Batches from an in-memory split: deterministic shuffling, drop-remainder, host sharding.

The order of an epoch is a permutation drawn from `(seed, epoch)` alone, so every host
computes the same global batches without talking to the others and a resumed run can start
an epoch at any batch. With `process_count` P, host p takes rows `[p B/P, (p+1) B/P)` of
each global batch of size B: the process-local slices that
`jax.make_array_from_process_local_data` stitches back into the global batch when the mesh
orders devices by process (as `jax.make_mesh` does).

Batches are gathered with numpy fancy indexing, which for the datasets here runs at millions
of examples per second (see `benchmarks/data_speed.py`), far above what a train step takes.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.data.dataset import Split

__all__ = ["epoch_order", "num_batches", "batches"]


def _check_nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch `epoch` visits the `n` examples: `[n]` int64.

    A permutation drawn from `numpy.random.default_rng([seed, epoch])`: the same on every
    host and machine for the same numpy version, different from one epoch to the next.

    Example:
      >>> epoch_order(5, seed=0, epoch=0, shuffle=False).tolist()
      [0, 1, 2, 3, 4]
      >>> sorted(epoch_order(5, seed=0, epoch=3).tolist())
      [0, 1, 2, 3, 4]
    """
    n = _check_nonneg_int(n, "n")
    seed, epoch = _check_nonneg_int(seed, "seed"), _check_nonneg_int(epoch, "epoch")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def num_batches(split: Split | int, *, batch_size: int, drop_remainder: bool = True) -> int:
    """Global batches per epoch: `N // B`, or `ceil(N / B)` without drop_remainder.

    Args:
      split: a `Split` or its number of examples N.
      batch_size: B, the global batch size.
      drop_remainder: drop the last partial batch.

    Example:
      >>> num_batches(10, batch_size=4), num_batches(10, batch_size=4, drop_remainder=False)
      (2, 3)
    """
    n = len(split) if isinstance(split, Split) else _check_nonneg_int(split, "split")
    batch_size = _checks.check_int(batch_size, "batch_size")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_count is None:
        import jax

        process_count = jax.process_count()
        if process_index is None:
            process_index = jax.process_index()
    if process_index is None:
        raise ValueError("`process_index` must be given when `process_count` is.")
    process_count = _checks.check_int(process_count, "process_count")
    if not isinstance(process_index, numbers.Integral) or not 0 <= process_index < process_count:
        raise ValueError(
            f"`process_index` must be an integer in [0, {process_count}), got {process_index!r}."
        )
    return int(process_index), int(process_count)


def batches(
    split: Split,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield this host's part of each global batch of one epoch, from batch `start` on.

    Args:
      split: the `Split` to read.
      batch_size: B, the global batch size over all hosts; must divide by `process_count`
        and be at most `len(split)`.
      seed, epoch: fix the order (`epoch_order`); the same on every host.
      shuffle: visit the examples in a random order (else in stored order).
      drop_remainder: drop the last partial batch. When kept, its size must also divide by
        `process_count`.
      start: the first batch to yield (a resumed run skips the batches it already did);
        costs nothing, in `[0, num_batches]`.
      process_index, process_count: this host and the number of hosts; default
        `jax.process_index()` and `jax.process_count()`.

    Yields:
      `{"x": [B/P, ...] float32, "y": [B/P] int32, "index": [B/P] int64}` numpy arrays;
      `index` is each example's position in the split (for a teacher-output cache).

    Raises:
      ValueError: batch_size is not positive, exceeds the split, does not divide by the host
        count; bad start, seed, epoch or host arguments.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.data import Split
      >>> split = Split("train", np.zeros((10, 3), np.float32), np.arange(10) % 2)
      >>> bs = list(batches(split, batch_size=4, seed=0, epoch=0, process_index=0,
      ...                   process_count=1))
      >>> len(bs), bs[0]["x"].shape, bs[0]["y"].dtype, bs[0]["index"].dtype
      (2, (4, 3), dtype('int32'), dtype('int64'))
    """
    if not isinstance(split, Split):
        raise TypeError(f"`split` must be a mtkd_jax.data.Split, got {type(split).__name__}.")
    n = len(split)
    steps = num_batches(n, batch_size=batch_size, drop_remainder=drop_remainder)
    if batch_size > n:
        raise ValueError(
            f"`batch_size` {batch_size} is larger than split {split.name!r} "
            f"({n} examples); use at most {n}."
        )
    p, count = _process(process_index, process_count)
    if batch_size % count:
        raise ValueError(
            f"`batch_size` {batch_size} must divide by `process_count` {count}, so every host "
            "gets an equal slice of the global batch."
        )
    remainder = n % batch_size
    if not drop_remainder and remainder % count:
        raise ValueError(
            f"With drop_remainder=False the last batch holds {remainder} examples of split "
            f"{split.name!r}, which does not divide by `process_count` {count}; use "
            "drop_remainder=True or a batch size that divides the split."
        )
    start = _check_nonneg_int(start, "start")
    if start > steps:
        raise ValueError(f"`start` must be in [0, {steps}] (batches per epoch), got {start}.")
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    for b in range(start, steps):
        global_idx = order[b * batch_size:(b + 1) * batch_size]
        local = global_idx.size // count
        idx = global_idx[p * local:(p + 1) * local]
        yield {"x": split.x[idx], "y": split.y[idx], "index": idx}
