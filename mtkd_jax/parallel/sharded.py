"""The library's steps and teachers compiled over a 2-D mesh with sharded parameters.

`sharded_step` is `mtkd_jax.parallel.data_parallel_step` with the parameters' layout as an
argument: the same un-jitted step (`make_distill_step`, `make_codistill_step`,
`make_supervised_step`, `stacked_step`, built with ``axis_name=None``) is compiled by
`jax.jit` with `in_shardings` / `out_shardings` from `state_shardings` and
`teacher_shardings`; the batch is split over the data axis. The step does not know the
layout: XLA's partitioner gathers each sharded weight where it is used and scatters the
gradients back (FSDP), or keeps tensor-parallel matmuls split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax.parallel.data_parallel import BATCH_AXES, batch_specs, replicate, shard_batch
from mtkd_jax.training.batch import check_batch

__all__ = [
    "sharded_step",
    "sharded_eval_step",
    "sharded_teacher_apply",
    "place",
    "abstract_like",
    "mesh_of",
]


def mesh_of(shardings: Any, name: str = "shardings") -> Mesh:
    """The one mesh of a tree of `NamedSharding`s (ValueError when none or several)."""
    meshes = {
        s.mesh for s in jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
        if isinstance(s, NamedSharding)
    }
    if len(meshes) != 1:
        raise ValueError(
            f"`{name}` must be NamedShardings over one mesh, got {len(meshes)} meshes."
        )
    return meshes.pop()


def place(tree: Any, shardings: Any) -> Any:
    """`jax.device_put(tree, shardings)`: each leaf onto its sharding (no copy when there).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.parallel import fsdp, make_mesh, place, tree_shardings
      >>> tree = {"w": jnp.zeros((8, 2))}
      >>> w = place(tree, tree_shardings(tree, make_mesh(2, 4), fsdp(min_size=1)))["w"]
      >>> w.addressable_shards[0].data.shape
      (2, 2)
    """
    return jax.device_put(tree, shardings)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves with `shardings`: a restore target.

    `mtkd_jax.training.checkpoint.Checkpointer.restore(abstract_like(state, s))` reads a checkpoint
    straight into the layout `s`, whatever mesh it was saved from.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.parallel import abstract_like, make_mesh, replicated, tree_shardings
      >>> tree = {"w": jnp.zeros((8, 2))}
      >>> mesh = make_mesh(1, 1, devices=jax.devices()[:1])
      >>> abstract_like(tree, tree_shardings(tree, mesh, replicated()))["w"].shape
      (8, 2)
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _kwarg_shardings(kwargs: Mapping[str, Any], teacher_shardings, replicated) -> dict:
    out = {}
    for k in kwargs:
        out[k] = teacher_shardings if (k == "teacher_params" and teacher_shardings is not None) \
            else replicated
    return out


def _compiler(fn, mesh: Mesh, first_shardings, teacher_shardings, data_axis, batch_axes,
              out_shardings, n_rest: int, donate: bool):
    """`get(batch_keys, kwarg_names) -> jitted fn` for `fn(first, batch, *rest, kwargs)`."""
    replicated = NamedSharding(mesh, P())
    cache: dict = {}

    def get(keys: tuple, kwargs: Mapping[str, Any]):
        names = tuple(sorted(kwargs))
        if (keys, names) not in cache:
            specs = batch_specs(dict.fromkeys(keys), data_axis, batch_axes=batch_axes)
            batch_sh = {k: NamedSharding(mesh, specs[k]) for k in keys}
            kw_sh = _kwarg_shardings(dict.fromkeys(names), teacher_shardings, replicated)
            in_sh = (first_shardings, batch_sh, *([replicated] * n_rest), kw_sh)
            cache[keys, names] = jax.jit(
                fn, in_shardings=in_sh, out_shardings=out_shardings,
                donate_argnums=(0,) if donate else (),
            )
        return cache[keys, names]

    def put(first, batch, rest, kwargs):
        """Arguments onto their shardings (host arrays transferred, placed ones left)."""
        check = teacher_shardings is not None and "teacher_params" in kwargs
        kw = {k: v for k, v in kwargs.items() if not (check and k == "teacher_params")}
        kw, rest = replicate((kw, rest), mesh)
        if check:
            kw["teacher_params"] = place(kwargs["teacher_params"], teacher_shardings)
        batch = shard_batch(batch, mesh, batch_axes=batch_axes, data_axis=data_axis)
        return place(first, first_shardings), batch, rest, kw

    return get, put


def _check_mesh(mesh: Mesh, data_axis: str, **shardings) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if data_axis not in mesh.axis_names:
        raise ValueError(f"`data_axis` {data_axis!r} is not an axis of the mesh {mesh.axis_names}.")
    for name, tree in shardings.items():
        if tree is not None and mesh_of(tree, name) != mesh:
            raise ValueError(
                f"`{name}` are over mesh {dict(mesh_of(tree, name).shape)}, not the step's "
                f"`mesh` {dict(mesh.shape)}: build them with `tree_shardings(..., mesh, rule)`."
            )


def _run(fn, args, data_axis: str):
    try:
        return fn(*args)
    except NameError as err:
        # A per-device step (axis_name=...) averages over the axis itself; under jit the
        # partitioner does, and JAX's error does not say so.
        if data_axis not in str(err):
            raise
        raise ValueError(
            f"the step reduces over {data_axis!r} itself: build it with axis_name=None for "
            f"a sharded step. JAX said: {str(err)[:200]}"
        ) from err


def sharded_step(
    step: Callable,
    mesh: Mesh,
    *,
    state_shardings: Any,
    teacher_shardings: Any = None,
    data_axis: str = "data",
    batch_axes: Mapping[str, int] = BATCH_AXES,
    num_classes: int | None = None,
    donate_state: bool = False,
) -> Callable:
    """Compile `step(state, batch, key, **kw) -> (state, metrics)` with sharded parameters.

    The returned function takes the same arguments. It places `state` on `state_shardings`
    (`state_shardings(state, mesh, rule)`), `teacher_params` on `teacher_shardings` (or
    replicated when None), the key and other keyword arguments replicated, splits the batch
    over `data_axis`, and runs one compiled program whose new state keeps `state_shardings`;
    metrics come back replicated. One compile per batch structure and shape. On a
    ``(data, 1)`` mesh with replicated rules this is `data_parallel_step`.

    Args:
      step: a train step built with ``axis_name=None`` (the partitioner averages).
      mesh: a mesh with `data_axis` (e.g. `make_mesh(2, 4)`).
      state_shardings: a `TrainState` of `NamedSharding`s (`state_shardings`).
      teacher_shardings: the teachers' shardings (`tree_shardings(teacher_params, mesh,
        rule)`), or None for replicated teachers.
      data_axis: the mesh axis the batch is split over.
      batch_axes: key -> batch axis of entries where it is not the first.
      num_classes: C, to check labels in `[0, C)` on the host.
      donate_state: donate the input state's buffers to the output.

    Returns:
      `parallel_step(state, batch, key, **kw) -> (state, metrics)`, with
      `parallel_step.lower(state, batch, key, **kw)` giving the lowered program (call
      `.compile()` for its `input_shardings` and `memory_analysis()`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.parallel import fsdp, make_mesh, sharded_step, state_shardings
      >>> from mtkd_jax.training.state import init_train_state
      >>> from mtkd_jax.training.steps import make_supervised_step
      >>> tx, mesh = optax.sgd(0.1), make_mesh(2, 4)
      >>> state = init_train_state(jnp.zeros((8, 4)), tx)
      >>> s = state_shardings(state, mesh, fsdp(min_size=1))
      >>> f = sharded_step(make_supervised_step(lambda w, x: x @ w, tx), mesh, state_shardings=s)
      >>> state, m = f(state, {"x": jnp.ones((4, 8)), "y": jnp.zeros(4, int)}, jax.random.key(0))
      >>> state.params.sharding.spec, state.params.addressable_shards[0].data.shape
      (P('model',), (2, 4))
    """
    _check_mesh(mesh, data_axis, state_shardings=state_shardings,
                teacher_shardings=teacher_shardings)
    replicated = NamedSharding(mesh, P())

    def call(state, batch, key, kwargs):
        return step(state, batch, key, **kwargs)

    get, put = _compiler(call, mesh, state_shardings, teacher_shardings, data_axis, batch_axes,
                         (state_shardings, replicated), 1, donate_state)

    def prepared(state, batch, key, kwargs):
        check_batch(batch, num_classes=num_classes)
        state, batch, (key,), kwargs = put(state, batch, (key,), kwargs)
        return get(tuple(batch), kwargs), (state, batch, key, kwargs)

    def parallel_step(state, batch, key, **kwargs):
        fn, args = prepared(state, batch, key, kwargs)
        return _run(fn, args, data_axis)

    def lower(state, batch, key, **kwargs):
        fn, args = prepared(state, batch, key, kwargs)
        return fn.lower(*args)

    parallel_step.lower = lower
    return parallel_step


def sharded_eval_step(
    eval_step: Callable,
    mesh: Mesh,
    *,
    params_shardings: Any,
    teacher_shardings: Any = None,
    data_axis: str = "data",
    batch_axes: Mapping[str, int] = BATCH_AXES,
) -> Callable:
    """Compile `eval_step(params, batch, **kw) -> stats` (`make_eval_step`) with shardings.

    Args:
      eval_step: from `mtkd_jax.training.evaluation.make_eval_step` (``axis_name=None``).
      mesh: a mesh with `data_axis`.
      params_shardings: the student's (params or variables) shardings, e.g.
        `tree_shardings(variables_of(state), mesh, rule)` or `state_shardings(...).params`.
      teacher_shardings: the teachers' shardings, or None for replicated teachers.
      data_axis: the mesh axis the batch is split over.
      batch_axes: key -> batch axis of entries where it is not the first.

    Returns:
      `run(params, batch, **kw) -> stats` (replicated), usable with
      `mtkd_jax.training.evaluation.evaluate`'s inputs batch by batch, with `run.lower` as in
      `sharded_step`.

    Example (any `eval_step(params, batch, **kw) -> stats` works; tests/test_sharding.py
    runs `make_eval_step`'s):
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.parallel import fsdp, make_mesh, sharded_eval_step, tree_shardings
      >>> mesh, w = make_mesh(2, 4), jnp.eye(8)
      >>> correct = lambda p, b: {"correct": jnp.sum(jnp.argmax(b["x"] @ p, -1) == b["y"])}
      >>> run = sharded_eval_step(correct, mesh,
      ...                         params_shardings=tree_shardings(w, mesh, fsdp(min_size=1)))
      >>> int(run(w, {"x": jnp.eye(8), "y": jnp.arange(8)})["correct"])
      8
    """
    _check_mesh(mesh, data_axis, params_shardings=params_shardings,
                teacher_shardings=teacher_shardings)

    def call(params, batch, kwargs):
        return eval_step(params, batch, **kwargs)

    get, put = _compiler(call, mesh, params_shardings, teacher_shardings, data_axis, batch_axes,
                         NamedSharding(mesh, P()), 0, False)

    def prepared(params, batch, kwargs):
        check_batch(batch)
        params, batch, _, kwargs = put(params, batch, (), kwargs)
        return get(tuple(batch), kwargs), (params, batch, kwargs)

    def run(params, batch, **kwargs):
        fn, args = prepared(params, batch, kwargs)
        return _run(fn, args, data_axis)

    def lower(params, batch, **kwargs):
        fn, args = prepared(params, batch, kwargs)
        return fn.lower(*args)

    run.lower = lower
    return run


def sharded_teacher_apply(
    teacher_apply: Callable,
    *,
    teacher_shardings: Any,
    data_axis: str | None = "data",
) -> Callable:
    """Jit `teacher_apply(teacher_params, x) -> [K, B, C]` with the teachers sharded.

    For teachers that fit only when sharded: the params stay on `teacher_shardings`, the
    batch is split over `data_axis` of their mesh (replicated when `data_axis` is None), and
    the logits come back `[K, B, C]` split on B the same way.

    Args:
      teacher_apply: from `mtkd_jax.teachers.make_stacked_apply` or
        `make_heterogeneous_apply` (un-jitted).
      teacher_shardings: `tree_shardings(teacher_params, mesh, rule)`.
      data_axis: the mesh axis to split the batch over, or None.

    Returns:
      `run(teacher_params, x) -> logits [K, B, C]` (one program per input shape).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.parallel import make_mesh, per_teacher, sharded_teacher_apply
      >>> from mtkd_jax.parallel import tree_shardings
      >>> from mtkd_jax.teachers import make_stacked_apply
      >>> tp = jnp.ones((4, 3, 2))
      >>> s = tree_shardings(tp, make_mesh(2, 4), per_teacher())
      >>> run = sharded_teacher_apply(make_stacked_apply(lambda w, x: x @ w, strategy="vmap"),
      ...                             teacher_shardings=s)
      >>> run(tp, jnp.ones((6, 3))).shape
      (4, 6, 2)
    """
    mesh = mesh_of(teacher_shardings, "teacher_shardings")
    if data_axis is not None:
        _check_mesh(mesh, data_axis)
    x_sharding = NamedSharding(mesh, P() if data_axis is None else P(data_axis))
    out_sharding = NamedSharding(mesh, P() if data_axis is None else P(None, data_axis))
    fn = jax.jit(teacher_apply, in_shardings=(teacher_shardings, x_sharding),
                 out_shardings=out_sharding)

    def run(teacher_params, x):
        if data_axis is not None:
            x = shard_batch({"x": x}, mesh, data_axis=data_axis)["x"]
        return fn(place(teacher_params, teacher_shardings), x)

    return run
