"""What a process of a multi-host run does with the others: who it is, its part of the
global batch, process 0's values, a barrier, its own copy of an array."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtkd_jax.parallel.data_parallel import global_batch_from_local

__all__ = [
    "ProcessInfo",
    "process_info",
    "is_main_process",
    "global_batches",
    "broadcast_from_main",
    "barrier",
    "process_local",
]


class ProcessInfo(NamedTuple):
    """Where this process stands in the job.

    Attributes:
      process_index: this process's id, in `[0, process_count)`.
      process_count: P, the number of processes.
      local_device_count: devices attached to this process.
      device_count: devices of all processes together.
      initialized: whether JAX's distributed runtime is running (False for a plain
        single-process run).
    """

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    initialized: bool


def process_info() -> ProcessInfo:
    """This process's `ProcessInfo` (initialises the JAX backend if it was not yet).

    Example:
      >>> from mtkd_jax.parallel import process_info
      >>> info = process_info()
      >>> info.process_index, info.process_count, info.initialized
      (0, 1, False)
    """
    return ProcessInfo(
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.distributed.is_initialized(),
    )


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs, tables and plots.

    Example:
      >>> from mtkd_jax.parallel import is_main_process
      >>> is_main_process()
      True
    """
    return jax.process_index() == 0


def global_batches(
    local_batches: Iterable[dict], mesh, *, data_axis: str | None = None
) -> Iterator[dict]:
    """Turn each process's slices of the global batches into global arrays on `mesh`.

    Every process iterates its own `local_batches` (e.g. `mtkd_jax.data.batches`, which
    yields rows `[p B/P, (p+1) B/P)` of each global batch on process p) in step; batch n of
    the result is the global batch n, split over all devices of the mesh, ready for a
    `data_parallel_step`. Closing the generator closes `local_batches` too.

    Args:
      local_batches: iterable of dicts of host arrays, `[B/P, ...]` on the batch axis
        (`[K, B/P, C]` for `"teacher_logits"`).
      mesh: a one-axis mesh over the devices of all processes (`parallel.data_mesh()`), or
        a mesh of several axes with `data_axis` (`mtkd_jax.parallel.make_mesh`).
      data_axis: the axis the batch is split over on a mesh of several axes.

    Yields:
      dicts of global `jax.Array`, batch size B, split over the mesh's data axis.

    Raises:
      ValueError: a local batch size that does not divide over this process's devices.

    Example:
      >>> import jax, numpy as np
      >>> from mtkd_jax.parallel import global_batches
      >>> from mtkd_jax.parallel import data_mesh
      >>> local = ({"x": np.full((4, 2), i, np.float32)} for i in range(3))
      >>> [b["x"].shape for b in global_batches(local, data_mesh(jax.devices()[:2]))]
      [(4, 2), (4, 2), (4, 2)]
    """
    source = iter(local_batches)
    try:
        for batch in source:
            yield global_batch_from_local(batch, mesh, data_axis=data_axis)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def broadcast_from_main(tree: Any) -> Any:
    """Process 0's values of `tree` (numpy arrays or scalars), on every process.

    For a decision each process would otherwise take on its own, e.g. anything chosen by
    timing or by local data (`mtkd_jax.teachers.choose_strategy` does this for its choice):
    the processes must compile the same program.
    On a single process, `tree` comes back as numpy arrays.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.parallel import broadcast_from_main
      >>> broadcast_from_main({"choice": np.int32(1)})
      {'choice': array(1, dtype=int32)}
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def barrier(name: str) -> None:
    """Wait until every process reaches `barrier(name)` (e.g. after process 0 wrote a file).

    Example:
      >>> from mtkd_jax.parallel import barrier
      >>> barrier("ready")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty str, got {name!r}.")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_local(tree: Any) -> Any:
    """Each leaf that spans several processes -> this process's first shard of it.

    Leaves that this process holds whole (host arrays, fully addressable `jax.Array`s) are
    returned as they are. For a replicated leaf the first shard is this process's full copy;
    for a leaf split over the batch axis it is this process's first slice. Used where a
    process must work on its own data without collectives (timing, cache building).

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.parallel import process_local
      >>> process_local({"w": np.ones(2)})["w"].tolist()
      [1.0, 1.0]
    """

    def local(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf.addressable_data(0)
        return leaf

    return jax.tree.map(local, tree)
