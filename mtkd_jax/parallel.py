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

Batches are dicts of arrays with the batch axis first, except ``"teacher_logits"``
(`[K, B, C]`, teacher axis first), split on its second axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "data_mesh",
    "replicate",
    "shard_batch",
    "global_batch_from_local",
    "batch_specs",
    "data_parallel_step",
    "global_mean",
]

# Batch entries whose batch axis is not the leading one: key -> position of the batch axis.
_BATCH_AXIS = {"teacher_logits": 1}


def data_mesh(devices=None, *, axis_name: str = "data") -> Mesh:
    """A one-axis mesh over `devices` (default: all devices of all processes).

    The axis type is `Auto` on purpose: `jax.make_mesh` defaults to `Explicit` axes in this
    JAX version, under which unsharded inputs to `jax.shard_map` raise.

    Args:
      devices: a sequence of devices, or None for `jax.devices()`.
      axis_name: the mesh axis name.

    Returns:
      `jax.sharding.Mesh` of shape `{axis_name: len(devices)}`.

    Example:
      >>> import jax
      >>> from mtkd_jax.parallel import data_mesh
      >>> data_mesh(jax.devices()[:1]).shape
      OrderedDict([('data', 1)])
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` must hold at least one device, got an empty sequence.")
    return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"`mesh` must have exactly one axis (the data axis), got axes {mesh.axis_names}."
        )
    return mesh.axis_names[0]


def replicate(tree, mesh: Mesh):
    """Place every leaf of `tree` on all devices of `mesh`, unsplit (`P()`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.parallel import data_mesh, replicate
      >>> replicate({"w": jnp.ones(3)}, data_mesh(jax.devices()[:1]))["w"].sharding.spec
      P()
    """
    sharding = NamedSharding(mesh, P())
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put_key(x):
        # Several processes: `device_put` of a typed PRNG key onto other processes' devices
        # raises (jax 0.10 handles only plain arrays there), so move its raw data instead.
        if (
            isinstance(x, jax.Array)
            and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            and x.sharding != sharding
        ):
            data = jax.device_put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return x

    return jax.device_put(jax.tree.map(put_key, tree), sharding)


def batch_specs(batch: dict, axis_name: str = "data") -> dict:
    """PartitionSpecs that split each batch entry on its batch axis.

    Args:
      batch: dict of arrays; the batch axis is the first, except `"teacher_logits"` `[K, B, C]`.
      axis_name: mesh axis to split over.

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
    return {k: P(*([None] * _BATCH_AXIS.get(k, 0)), axis_name) for k in batch}


def _batch_size(batch: dict) -> int:
    sizes = {}
    for k, v in batch.items():
        ax = _BATCH_AXIS.get(k, 0)
        if np.ndim(v) <= ax:
            raise ValueError(
                f"`batch[{k!r}]` has shape {np.shape(v)}: no batch axis at position {ax}."
            )
        sizes[k] = np.shape(v)[ax]
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


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Split a global batch (held by this process) over the mesh's data axis.

    Args:
      batch: dict of arrays, global batch size B on the batch axis (see `batch_specs`).
      mesh: a one-axis mesh (`data_mesh`).

    Returns:
      dict of `jax.Array`, each split over the devices.

    Raises:
      ValueError: if B is not a multiple of the number of devices.

    Example:
      >>> import jax, numpy as np
      >>> from mtkd_jax.parallel import data_mesh, shard_batch
      >>> b = shard_batch({"x": np.ones((4, 3), np.float32)}, data_mesh(jax.devices()[:2]))
      >>> b["x"].sharding.spec, b["x"].shape
      (P('data',), (4, 3))
    """
    axis = _axis(mesh)
    _check_divisible(_batch_size(batch), mesh.shape[axis], "Global batch size")
    specs = batch_specs(batch, axis)
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in batch.items()}


def global_batch_from_local(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble a global batch from each process's local slice (multi-host data loading).

    Each process calls this with its own slice of the batch (the same batch size on every
    process); the result is a global `jax.Array` per entry, split over all devices. After
    `jax.distributed.initialize()`, this is how several hosts feed one data-parallel step. On
    one process it equals `shard_batch`.

    Args:
      local_batch: dict of host arrays, local batch size B_local on the batch axis.
      mesh: a one-axis mesh over the devices of all processes.

    Returns:
      dict of global `jax.Array`, batch size B_local * process_count.

    Raises:
      ValueError: if B_local is not a multiple of this process's devices in the mesh.

    Example:
      >>> import jax, numpy as np
      >>> from mtkd_jax.parallel import data_mesh, global_batch_from_local
      >>> g = global_batch_from_local({"x": np.ones((2, 3))}, data_mesh(jax.devices()[:2]))
      >>> g["x"].shape
      (2, 3)
    """
    axis = _axis(mesh)
    n_local = len(mesh.local_devices)
    _check_divisible(_batch_size(local_batch), n_local, "Local (per-process) batch size")
    specs = batch_specs(local_batch, axis)
    return {
        k: jax.make_array_from_process_local_data(NamedSharding(mesh, specs[k]), np.asarray(v))
        for k, v in local_batch.items()
    }


def global_mean(values: jax.Array, weights: jax.Array | None = None, *, axis_name=None):
    r"""Weighted mean over the batch axis of the global batch, written to be pmean'd.

    Without `axis_name`: :math:`\sum_b w_b v_b / \sum_b w_b` over the leading axis. With
    `axis_name` (inside `shard_map`/`pmap` over D devices), each device returns
    :math:`D \sum_{b \in \text{device}} w_b v_b / \sum_{\text{all } b} w_b`, so that
    `jax.lax.pmean` of the per-device values, and of their gradients, is the global weighted
    mean even when devices hold different numbers of weighted (e.g. labeled) examples.
    A zero total weight gives 0.

    Args:
      values: `[B, ...]`.
      weights: optional `[B]` non-negative weights (e.g. a label mask), None for all ones.
      axis_name: the mapped data axis, or None.

    Returns:
      `[...]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.parallel import global_mean
      >>> global_mean(jnp.array([1.0, 2.0, 6.0]), jnp.array([1.0, 1.0, 0.0]))
      Array(1.5, dtype=float32)
    """
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)  # e.g. boolean "correct" flags
    if weights is None:
        weights = jnp.ones(values.shape[:1], values.dtype)
    w = jnp.asarray(weights, values.dtype)
    local_sum = jnp.tensordot(w, values, axes=(0, 0))
    count = jnp.sum(w)
    scale = 1.0
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
        scale = jax.lax.axis_size(axis_name)
    # The count carries no gradient (it is a mask sum), so dividing by it keeps the gradient
    # of the pmean equal to the gradient of the global mean.
    count = jax.lax.stop_gradient(count)
    return scale * local_sum / jnp.maximum(count, jnp.finfo(values.dtype).tiny)


def as_varying(tree, axis_name):
    """Mark replicated params as varying over `axis_name` before differentiating them.

    Inside `jax.shard_map` (with its default `check_vma=True`) a replicated input is typed
    invariant, and the transpose of its implicit broadcast is a psum: the gradient comes back
    already summed over devices, and a following pmean would leave it D times too large.
    Cast to varying, the gradient stays per-device and one pmean gives the global mean. Under
    `jax.pmap`, `jax.vmap(axis_name=...)` or `check_vma=False` nothing is tracked and the
    tree is returned unchanged, as are leaves that are varying already.

    Args:
      tree: a pytree of arrays.
      axis_name: the mapped data axis, or None (no-op).

    Returns:
      The same values, typed varying over `axis_name` where that applies.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.parallel import as_varying
      >>> as_varying({"w": jnp.ones(2)}, None)["w"]
      Array([1., 1.], dtype=float32)
    """
    if axis_name is None:
        return tree

    def cast(x):
        try:
            return jax.lax.pcast(x, axis_name, to="varying")
        except ValueError:
            # "from=varying" (already per-device) or "should be called under shard_map"
            # (vmap); in both the gradient is per-device already.
            return x

    return jax.tree.map(cast, tree)


def _step_axis_name(step) -> str | None:
    """The `axis_name` a step factory recorded on the step (through functools.partial)."""
    while step is not None:
        if hasattr(step, "axis_name"):
            return step.axis_name
        step = getattr(step, "func", None)
    return None


def data_parallel_step(
    step: Callable,
    mesh: Mesh,
    *,
    mode: str = "jit",
    donate_state: bool = False,
) -> Callable:
    """Compile `step(state, batch, key, **kw) -> (state, metrics)` data-parallel on `mesh`.

    The returned function takes the same arguments. Keywords bound with
    `functools.partial(step, teacher_params=tp)` become replicated arguments of the compiled
    program rather than constants baked into it. It places `state`, `key` and the keyword
    arguments (e.g. `teacher_params`) replicated on every device and splits `batch` over the
    data axis (host arrays are transferred; arrays already placed so are left alone), then
    runs one compiled program; new state and metrics come back replicated. It compiles once
    per batch structure and shape: no retracing across steps.

    Args:
      step: a train step from `mtkd_jax.train`. For ``mode="jit"`` built with
        ``axis_name=None``; for ``mode="shard_map"`` with ``axis_name`` equal to the mesh's
        axis name.
      mesh: a one-axis mesh (`data_mesh`).
      mode: ``"jit"`` (global view, GSPMD) or ``"shard_map"`` (per-device view, explicit
        pmean in the step).
      donate_state: donate the input state's buffers to the output (saves memory; the old
        state must not be used afterwards).

    Returns:
      `parallel_step(state, batch, key, **kw) -> (state, metrics)`.

    Raises:
      ValueError: for an unknown mode, a step whose recorded `axis_name` does not fit the
        mode, or (when called) a batch size that does not divide over the devices.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.parallel import data_mesh, data_parallel_step
      >>> def step(state, batch, key):
      ...     return state + jnp.mean(batch["x"]), {"mean": jnp.mean(batch["x"])}
      >>> f = data_parallel_step(step, data_mesh(jax.devices()[:2]))
      >>> f(jnp.zeros(()), {"x": jnp.arange(4.0)}, jax.random.key(0))[1]["mean"]
      Array(1.5, dtype=float32)
    """
    axis = _axis(mesh)
    recorded = _step_axis_name(step)
    if mode == "jit":
        if recorded is not None:
            raise ValueError(
                f"mode='jit' needs a step built with axis_name=None (the partitioner averages "
                f"gradients over the global batch); this step has axis_name={recorded!r}."
            )
    elif mode == "shard_map":
        if recorded is not None and recorded != axis:
            raise ValueError(
                f"mode='shard_map' needs a step built with axis_name={axis!r} (the mesh axis); "
                f"this step has axis_name={recorded!r}."
            )
    else:
        raise ValueError(f"`mode` must be 'jit' or 'shard_map', got {mode!r}.")

    bound = {}
    if isinstance(step, functools.partial) and not step.args:
        # `functools.partial(step, teacher_params=tp)` (the library's binding convention):
        # closed over, the teachers would be baked into the program as constants; passed as
        # replicated arguments they are transferred once and not copied into the executable.
        step, bound = step.func, replicate(dict(step.keywords), mesh)

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
                specs = batch_specs(dict.fromkeys(keys), axis)
                fn = jax.shard_map(
                    call, mesh=mesh, in_specs=(P(), specs, P(), P()), out_specs=(P(), P())
                )
            compiled[keys] = jax.jit(fn, out_shardings=replicated, donate_argnums=donate)
        return compiled[keys]

    def parallel_step(state, batch, key, **kwargs):
        batch = shard_batch(batch, mesh)
        state, key, kwargs = replicate((state, key, {**bound, **kwargs}), mesh)
        return get_compiled(tuple(batch))(state, batch, key, kwargs)

    return parallel_step
