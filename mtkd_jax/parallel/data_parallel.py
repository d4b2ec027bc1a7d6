"""Data parallelism over a one-axis `("data",)` mesh, with the current JAX sharding API.

The same train step runs unchanged on 1 device, D devices of one host, or several hosts:
parameters (and teachers) are replicated, `P()`, and the batch is split over the devices,
`P("data")`. `data_parallel_step` offers two ways to compile it:

* ``mode="jit"`` (default): `jax.jit` over the global batch; XLA's SPMD partitioner inserts
  the gradient all-reduce. The step is built with ``axis_name=None`` and reads like
  single-device code.
* ``mode="shard_map"``: a per-device view with `jax.shard_map`; the step must be built with
  ``axis_name="data"`` and does its own `jax.lax.pmean`. The same per-device step also runs
  inside a user's own ``jax.pmap(step, axis_name="data")``.

Random draws (Dropout masks, augmentation): in ``mode="jit"`` the model sees the global
batch and XLA's partitioned PRNG gives each device its slice of the one-device masks, so the
run is the one-device run whatever the device count. In ``mode="shard_map"`` each device
folds its index on the axis into the step's key (`mtkd_jax.training.steps.common.device_key`) and
draws masks for its own rows: different on every device, deterministic for a given key and
device count, but not slices of the one-device masks (equal to the one-device run in
distribution, not bit for bit).

Batches are dicts of arrays with the batch axis first, except the entries named in
`batch_axes` (default `BATCH_AXES`: ``"teacher_logits"`` `[K, B, C]`, teacher axis first,
split on its second axis). What is split how is always an argument, never read off the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax.parallel.mesh import place
from mtkd_jax.training.batch import check_batch

__all__ = [
    "BATCH_AXES",
    "shard_batch",
    "global_batch_from_local",
    "batch_specs",
    "data_parallel_step",
]

BATCH_AXES: Mapping[str, int] = {
    "teacher_logits": 1,
    "teacher_top_k": 1,  # top-k cache entries read as stored (cache.with_cached_top_k)
    # teachers with their own tokenizers (mtkd_jax.data.alignment.pack_aligned), [K, B, ...]
    "teacher_available": 1, "teacher_index": 1, "teacher_tokens": 1,
    "teacher_segment_ids": 1, "teacher_positions": 1, "teacher_unmatched": 1,
}
"""Batch entries whose batch axis is not the leading one: key -> position of the batch axis."""


def _axis(mesh: Mesh, data_axis: str | None = None) -> str:
    if data_axis is not None:
        if data_axis not in mesh.axis_names:
            raise ValueError(
                f"`data_axis` {data_axis!r} is not an axis of the mesh {mesh.axis_names}."
            )
        return data_axis
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"`mesh` must have exactly one axis (the data axis), got axes {mesh.axis_names}."
        )
    return mesh.axis_names[0]


def batch_specs(
    batch: dict, axis_name: str = "data", *, batch_axes: Mapping[str, int] = BATCH_AXES
) -> dict:
    """PartitionSpecs that split each batch entry on its batch axis.

    Args:
      batch: dict of arrays; the batch axis is the first, except for the keys in `batch_axes`.
      axis_name: mesh axis to split over.
      batch_axes: key -> position of that entry's batch axis (default `BATCH_AXES`).

    Returns:
      dict of `PartitionSpec`, same keys as `batch`.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.parallel import batch_specs
      >>> batch_specs({"x": np.ones((4, 2)), "teacher_logits": np.ones((3, 4, 5))})
      {'x': P('data',), 'teacher_logits': P(None, 'data')}
    """
    if not isinstance(batch, dict):
        raise TypeError(f"`batch` must be a dict of arrays, got {type(batch).__name__}.")
    return {k: P(*([None] * batch_axes.get(k, 0)), axis_name) for k in batch}


def _batch_size(batch: dict, batch_axes: Mapping[str, int]) -> int:
    sizes = {}
    for k, entry in batch.items():
        ax = batch_axes.get(k, 0)
        # An entry may be a pytree (a transformer's {"tokens", "segment_ids"} input): every
        # leaf has the batch axis at the same position.
        for path, v in jax.tree_util.tree_leaves_with_path(entry):
            name = f"{k}{jax.tree_util.keystr(path)}"
            if np.ndim(v) <= ax:
                raise ValueError(
                    f"`batch[{name!r}]` has shape {np.shape(v)}: no batch axis at position "
                    f"{ax}."
                )
            sizes[name] = np.shape(v)[ax]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Batch entries disagree on the batch size: {sizes}.")
    return next(iter(sizes.values()))


def _check_divisible(b: int, d: int, what: str) -> None:
    if b % d:
        raise ValueError(
            f"{what} {b} does not divide over {d} devices: use a batch size that is a "
            f"multiple of {d} (e.g. {max(d, b - b % d)}), or pad the batch and mask the "
            "padding; examples are never dropped silently."
        )


def shard_batch(
    batch: dict,
    mesh: Mesh,
    *,
    batch_axes: Mapping[str, int] = BATCH_AXES,
    data_axis: str | None = None,
) -> dict:
    """Split a global batch (held by this process) over the mesh's data axis.

    Args:
      batch: dict of arrays, global batch size B on the batch axis (see `batch_specs`).
      mesh: a one-axis mesh (`make_mesh()`), or any mesh with `data_axis`.
      batch_axes: key -> position of that entry's batch axis (default `BATCH_AXES`).
      data_axis: the axis to split over on a mesh of several axes (e.g. ``"data"`` of a
        `mtkd_jax.parallel.make_mesh` mesh; the batch is replicated over the others).

    Returns:
      dict of `jax.Array`, each split over the devices.

    Raises:
      ValueError: if B is not a multiple of the number of devices.

    Example:
      >>> import jax, numpy as np
      >>> from mtkd_jax.parallel import make_mesh, shard_batch
      >>> b = shard_batch({"x": np.ones((4, 3), np.float32)}, make_mesh(devices=jax.devices()[:2]))
      >>> b["x"].sharding.spec, b["x"].shape
      (P('data',), (4, 3))
    """
    axis = _axis(mesh, data_axis)
    _check_divisible(_batch_size(batch, batch_axes), mesh.shape[axis], "Global batch size")
    specs = batch_specs(batch, axis, batch_axes=batch_axes)
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in batch.items()}


def global_batch_from_local(
    local_batch: dict,
    mesh: Mesh,
    *,
    batch_axes: Mapping[str, int] = BATCH_AXES,
    data_axis: str | None = None,
) -> dict:
    """Assemble a global batch from each process's local slice (multi-host data loading).

    Each process calls this with its own slice of the batch (the same batch size on every
    process); the result is a global `jax.Array` per entry, split over all devices. After
    `jax.distributed.initialize()`, this is how several hosts feed one data-parallel step. On
    one process it equals `shard_batch`.

    Args:
      local_batch: dict of host arrays, local batch size B_local on the batch axis.
      mesh: a one-axis mesh over the devices of all processes (or any mesh with
        `data_axis`).
      batch_axes: key -> position of that entry's batch axis (default `BATCH_AXES`).
      data_axis: the axis to split over on a mesh of several axes (see `shard_batch`).

    Returns:
      dict of global `jax.Array`, batch size B_local * process_count.

    Raises:
      ValueError: if B_local is not a multiple of this process's devices in the mesh.

    Example:
      >>> import jax, numpy as np
      >>> from mtkd_jax.parallel import global_batch_from_local, make_mesh
      >>> g = global_batch_from_local({"x": np.ones((2, 3))}, make_mesh(devices=jax.devices()[:2]))
      >>> g["x"].shape
      (2, 3)
    """
    axis = _axis(mesh, data_axis)
    # Devices of this process along the data axis (all of them on a one-axis mesh).
    n_local = len(mesh.local_devices) * mesh.shape[axis] // mesh.size
    _check_divisible(
        _batch_size(local_batch, batch_axes), n_local, "Local (per-process) batch size"
    )
    specs = batch_specs(local_batch, axis, batch_axes=batch_axes)
    return {
        k: jax.tree.map(lambda leaf, spec=specs[k]: jax.make_array_from_process_local_data(
            NamedSharding(mesh, spec), np.asarray(leaf)), v)
        for k, v in local_batch.items()
    }


def data_parallel_step(
    step: Callable,
    mesh: Mesh,
    *,
    mode: str = "jit",
    batch_axes: Mapping[str, int] = BATCH_AXES,
    num_classes: int | None = None,
    donate_state: bool = False,
) -> Callable:
    """Compile `step(state, batch, key, **kw) -> (state, metrics)` data-parallel on `mesh`.

    The returned function takes the same arguments. It places `state`, `key` and the keyword
    arguments (e.g. `teacher_params`: replicated arguments of the compiled program, not
    constants baked into it) on every device, `P()`, splits `batch` over the data axis
    (host arrays are transferred; arrays already placed so are left alone), then runs one
    compiled program; new state and metrics come back replicated. It compiles once per batch
    structure and shape: no retracing across steps. Every host batch is first checked on the
    host (`mtkd_jax.training.batch.check_batch`: not empty, labels in range when `num_classes` is
    given), which costs the compiled step nothing.

    Args:
      step: a train step from `mtkd_jax.training.steps`. For ``mode="jit"`` built with
        ``axis_name=None``; for ``mode="shard_map"`` with ``axis_name`` equal to the mesh's
        axis name (a mismatch is reported when the step is first traced).
      mesh: a one-axis mesh (`make_mesh()`).
      mode: ``"jit"`` (global view, GSPMD) or ``"shard_map"`` (per-device view, explicit
        pmean in the step).
      batch_axes: key -> position of the batch axis of entries where it is not the first
        (default `BATCH_AXES`, ``{"teacher_logits": 1}``).
      num_classes: C, to check labels in `[0, C)` on the host.
      donate_state: donate the input state's buffers to the output (saves memory; the old
        state must not be used afterwards).

    Returns:
      `parallel_step(state, batch, key, **kw) -> (state, metrics)`, which runs one compiled
      program per batch structure.

    Raises:
      ValueError: for an unknown mode, a step built for the other mode (at the first call),
        or (when called) a bad batch or a batch size that does not divide over the devices.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.parallel import data_parallel_step, make_mesh
      >>> def step(state, batch, key):
      ...     return state + jnp.mean(batch["x"]), {"mean": jnp.mean(batch["x"])}
      >>> f = data_parallel_step(step, make_mesh(devices=jax.devices()[:2]))
      >>> f(jnp.zeros(()), {"x": jnp.arange(4.0)}, jax.random.key(0))[1]["mean"]
      Array(1.5, dtype=float32)
    """
    axis = _axis(mesh)
    if mode not in ("jit", "shard_map"):
        raise ValueError(f"`mode` must be 'jit' or 'shard_map', got {mode!r}.")

    def call(state, batch, key, kwargs):
        return step(state, batch, key, **kwargs)

    replicated = NamedSharding(mesh, P())
    donate = (0,) if donate_state else ()
    compiled: dict = {}

    def get_compiled(keys: tuple):
        if keys not in compiled:
            if mode == "jit":
                fn = call
            else:
                specs = batch_specs(dict.fromkeys(keys), axis, batch_axes=batch_axes)
                fn = jax.shard_map(
                    call, mesh=mesh, in_specs=(P(), specs, P(), P()), out_specs=(P(), P())
                )
            compiled[keys] = jax.jit(fn, out_shardings=replicated, donate_argnums=donate)
        return compiled[keys]

    def run(fn, args):
        try:
            return fn(*args)
        except (NameError, AssertionError, ValueError) as err:
            # The step and the mode disagree on who averages over the devices; JAX's own
            # errors for that do not say so.
            text = str(err)
            if mode == "jit" and isinstance(err, NameError) and axis in text:
                hint = f"reduces over {axis!r} itself: build it with axis_name=None"
            elif mode == "shard_map" and (
                isinstance(err, NameError | AssertionError) or "out_specs" in text
            ):
                hint = (
                    f"must average over the mesh axis itself: build it with "
                    f"axis_name={axis!r}"
                )
            else:
                raise
            raise ValueError(
                f"mode={mode!r} and the step disagree: the step {hint} (or use the other "
                f"mode). JAX said: {type(err).__name__}: {text[:300]}"
            ) from err

    def parallel_step(state, batch, key, **kwargs):
        check_batch(batch, num_classes=num_classes)
        batch = shard_batch(batch, mesh, batch_axes=batch_axes)
        state, key, kwargs = place((state, key, kwargs), mesh)
        return run(get_compiled(tuple(batch)), (state, batch, key, kwargs))

    return parallel_step
