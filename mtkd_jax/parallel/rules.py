r"""Sharding rules for parameter pytrees over a 2-D `("data", "model")` mesh.

A **rule** is a plain function `rule(path, shape, mesh) -> PartitionSpec` that says how one
leaf is laid out: `path` is the leaf's place in the tree as ``"Dense_0/kernel"`` (dict keys,
attribute names and sequence indices joined by ``/``), `shape` its shape. Rules here:

* `replicated()`: every leaf whole on every device, `P()` (today's data parallelism).
* `fsdp(axis="model", min_size=...)`: fully sharded, each leaf of at least `min_size`
  elements split along its largest axis whose size the `axis` size divides; smaller leaves
  (biases, norms) and leaves with no divisible axis replicated.
* `tensor_parallel({pattern: spec})`: the user's mapping from path regexes
  (`re.fullmatch`, first match wins) to `PartitionSpec`s; unmatched leaves go to `default`.
* `stacked(rule)`: K same-architecture models stacked on a leading axis, each slice laid out
  by `rule` (the K axis unsplit); `per_teacher(axis="model")`: one teacher (or K / M) per
  device group, the K axis split over `axis`.

`tree_shardings(tree, mesh, rule)` applies a rule to any pytree and checks every spec (rank,
mesh axes, divisibility), naming the path of a leaf it cannot lay out.
`state_shardings(state, mesh, rule)` does it for a whole `TrainState`: the optimizer state's
params-shaped subtrees (Adam's `mu`, `nu`, ...) take the params' shardings, the step and
other small leaves are replicated. Teachers and student may use different rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax.training.state import TrainState

__all__ = [
    "Rule",
    "make_mesh",
    "replicated",
    "fsdp",
    "tensor_parallel",
    "stacked",
    "per_teacher",
    "tree_shardings",
    "state_shardings",
]

Rule = Callable[[str, tuple, Mesh], P]
"""`rule(path: str, shape: tuple[int, ...], mesh) -> PartitionSpec` for one leaf."""

DEFAULT_MIN_SIZE = 2**14
"""Leaves with fewer elements than this are replicated by `fsdp` (not worth a collective)."""


def make_mesh(
    data: int,
    model: int,
    *,
    devices: Sequence[Any] | None = None,
    axis_names: tuple[str, str] = ("data", "model"),
) -> Mesh:
    """A 2-D mesh `data x model` over `devices` (default: all devices of all processes).

    The batch is split over the first axis, parameters over the second. Axes are `Auto`
    (as `mtkd_jax.parallel.data_mesh`): the partitioner places the collectives.

    Args:
      data: size of the data axis.
      model: size of the model axis (FSDP or tensor-parallel shards of each weight).
      devices: data * model devices, or None for `jax.devices()` (which must then be
        exactly data * model).
      axis_names: the two axis names, e.g. ``("data", "fsdp")``.

    Example:
      >>> import jax
      >>> from mtkd_jax.parallel import make_mesh
      >>> make_mesh(1, 1, devices=jax.devices()[:1]).shape
      OrderedDict([('data', 1), ('model', 1)])
    """
    for v, name in ((data, "data"), (model, "model")):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {v!r}.")
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) != data * model:
        raise ValueError(
            f"a {data}x{model} mesh needs {data * model} devices, got {len(devices)} "
            "(pass `devices` or change the mesh shape)."
        )
    if len(axis_names) != 2 or len(set(axis_names)) != 2:
        raise ValueError(f"`axis_names` must be two distinct names, got {axis_names!r}.")
    return jax.make_mesh(
        (data, model), tuple(axis_names), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def replicated() -> Rule:
    """Every leaf whole on every device, `P()`.

    Example:
      >>> import jax
      >>> from mtkd_jax.parallel import make_mesh, replicated
      >>> replicated()("w", (8, 4), make_mesh(1, 1, devices=jax.devices()[:1]))
      P()
    """

    def rule(path: str, shape: tuple, mesh: Mesh) -> P:
        return P()

    return rule


def fsdp(*, axis: str = "model", min_size: int = DEFAULT_MIN_SIZE) -> Rule:
    """Fully sharded: each large leaf split along its largest axis divisible by `axis`'s size.

    Args:
      axis: the mesh axis to split over.
      min_size: leaves with fewer elements are replicated.

    Returns:
      A rule. Of the leaf's axes whose size the mesh axis size divides, the largest is split
      (the first one among equals); a leaf with none is replicated.

    Example:
      >>> import jax
      >>> from mtkd_jax.parallel import fsdp, make_mesh
      >>> mesh = make_mesh(2, 4)
      >>> rule = fsdp(min_size=16)
      >>> rule("kernel", (6, 32), mesh), rule("bias", (6,), mesh), rule("odd", (5, 7), mesh)
      (P(None, 'model'), P(), P())
    """
    if not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ValueError(f"`min_size` must be an int >= 0, got {min_size!r}.")

    def rule(path: str, shape: tuple, mesh: Mesh) -> P:
        if axis not in mesh.shape:
            raise ValueError(
                f"fsdp(axis={axis!r}) for {path!r}: the mesh has axes {mesh.axis_names}."
            )
        n = mesh.shape[axis]
        if math.prod(shape) < min_size or n == 1:
            return P()
        fits = [i for i, d in enumerate(shape) if d % n == 0]
        if not fits:
            return P()
        best = max(fits, key=lambda i: (shape[i], -i))
        return P(*([None] * best), axis)

    return rule


def tensor_parallel(mapping: Mapping[str, P], *, default: Rule | None = None) -> Rule:
    """The user's layout: path regexes -> `PartitionSpec`s, the first full match wins.

    Args:
      mapping: ``{pattern: PartitionSpec}``; a pattern is matched with `re.fullmatch`
        against the leaf's path (``"Dense_0/kernel"``), in the mapping's order.
      default: the rule for leaves no pattern matches (default `replicated()`).

    Example (Megatron-style MLP: first kernel split on its outputs, second on its inputs):
      >>> import jax
      >>> from jax.sharding import PartitionSpec as P
      >>> from mtkd_jax.parallel import make_mesh, tensor_parallel
      >>> rule = tensor_parallel({r".*0/kernel": P(None, "model"), r".*1/kernel": P("model")})
      >>> mesh = make_mesh(2, 4)
      >>> rule("Dense_0/kernel", (8, 16), mesh), rule("Dense_1/bias", (4,), mesh)
      (P(None, 'model'), P())
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"`mapping` must be a dict of pattern -> PartitionSpec, got {mapping!r}.")
    compiled = []
    for pattern, spec in mapping.items():
        if not isinstance(spec, P):
            raise TypeError(
                f"`mapping[{pattern!r}]` must be a jax.sharding.PartitionSpec, got {spec!r}."
            )
        try:
            compiled.append((re.compile(pattern), spec))
        except (re.error, TypeError) as error:
            raise ValueError(f"`mapping` key {pattern!r} is not a regex: {error}") from None
    fallback = replicated() if default is None else default

    def rule(path: str, shape: tuple, mesh: Mesh) -> P:
        for regex, spec in compiled:
            if regex.fullmatch(path):
                return spec
        return fallback(path, shape, mesh)

    return rule


def stacked(rule: Rule) -> Rule:
    """K models stacked on a leading axis: each `[...]` slice laid out by `rule`, K unsplit.

    Example:
      >>> from mtkd_jax.parallel import fsdp, make_mesh, stacked
      >>> stacked(fsdp(min_size=1))("kernel", (3, 8, 2), make_mesh(2, 4))
      P(None, 'model')
    """

    def stacked_rule(path: str, shape: tuple, mesh: Mesh) -> P:
        if len(shape) == 0:
            return P()
        return P(None, *rule(path, tuple(shape[1:]), mesh))

    return stacked_rule


def per_teacher(*, axis: str = "model", rule: Rule | None = None) -> Rule:
    """One teacher per device group: the leading K axis split over `axis`.

    With K = M (the axis size) each group of devices along `axis` holds one whole teacher
    (K / M when M divides K). The other axes are laid out by `rule` (default unsplit; it must
    not use `axis` again).

    Example:
      >>> from mtkd_jax.parallel import make_mesh, per_teacher
      >>> per_teacher()("kernel", (4, 8, 2), make_mesh(2, 4))
      P('model',)
    """
    inner = replicated() if rule is None else rule

    def teacher_rule(path: str, shape: tuple, mesh: Mesh) -> P:
        if len(shape) == 0:
            raise ValueError(
                f"per_teacher: {path!r} is a scalar; every teacher leaf needs a leading K axis."
            )
        return P(axis, *inner(path, tuple(shape[1:]), mesh))

    return teacher_rule


def _path_str(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _axes_of(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _checked(spec: Any, shape: tuple, mesh: Mesh, where: str) -> P:
    """`spec` if it can lay out an array of `shape` on `mesh`; else a ValueError at `where`."""
    if not isinstance(spec, P):
        raise TypeError(f"the rule gave {spec!r} for {where}, not a PartitionSpec.")
    if len(spec) > len(shape):
        raise ValueError(
            f"{where} has shape {shape} (rank {len(shape)}) but its PartitionSpec {spec} has "
            f"{len(spec)} entries: give at most one entry per axis."
        )
    seen: set = set()
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
        axes = _axes_of(entry)
        for a in axes:
            if a not in mesh.shape:
                raise ValueError(
                    f"{where}: PartitionSpec {spec} names mesh axis {a!r}, but the mesh has "
                    f"axes {tuple(mesh.axis_names)}."
                )
            if a in seen:
                raise ValueError(f"{where}: PartitionSpec {spec} uses mesh axis {a!r} twice.")
            seen.add(a)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            raise ValueError(
                f"{where} has shape {shape}: axis {dim} of size {size} does not divide over "
                f"{parts} devices ({spec} over mesh {dict(mesh.shape)}); pick another spec or "
                "axis, or replicate it."
            )
    entries = tuple(spec)
    while entries and entries[-1] is None:  # P(None) is P(): one spelling per layout
        entries = entries[:-1]
    return P(*entries)


def _shape(leaf) -> tuple:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def tree_shardings(tree: Any, mesh: Mesh, rule: Rule, *, prefix: str = "") -> Any:
    """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s) by `rule`.

    Args:
      tree: any pytree of arrays (params, a teacher stack, model state).
      mesh: the mesh (`make_mesh`).
      rule: a sharding rule (`replicated`, `fsdp`, `tensor_parallel`, `stacked`, ...).
      prefix: written before each path in error messages (e.g. ``"teacher_params/"``).

    Returns:
      A pytree of the same structure with a `jax.sharding.NamedSharding` per leaf (pass it
      to `jax.device_put`, `jax.jit(in_shardings=...)` or `sharded_step`).

    Raises:
      ValueError: a spec that cannot apply (more entries than the leaf has axes, a mesh axis
        the mesh does not have or used twice, an axis size the shard count does not divide),
        naming the leaf's path, its shape and the spec.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.parallel import fsdp, make_mesh, tree_shardings
      >>> params = {"dense": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)}}
      >>> s = tree_shardings(params, make_mesh(2, 4), fsdp(min_size=64))
      >>> s["dense"]["kernel"].spec, s["dense"]["bias"].spec
      (P('model',), P())
    """

    def one(path, leaf):
        name = _path_str(path)
        shape = _shape(leaf)
        spec = rule(name, shape, mesh)
        where = f"`{(prefix + name).rstrip('/')}`"
        return NamedSharding(mesh, _checked(spec, shape, mesh, where))

    return jax.tree_util.tree_map_with_path(one, tree)


def _like(params: Any) -> Callable[[Any], bool]:
    """Whether a node has the params' tree structure and leaf shapes (an optax moment)."""
    treedef = jax.tree.structure(params)
    shapes = [_shape(x) for x in jax.tree.leaves(params)]

    def check(node) -> bool:
        try:
            if jax.tree.structure(node) != treedef:
                return False
        except Exception:  # noqa: BLE001 - any node that is no pytree is not params-like
            return False
        return [_shape(x) for x in jax.tree.leaves(node)] == shapes

    return check


def state_shardings(
    state: TrainState,
    mesh: Mesh,
    rule: Rule,
    *,
    model_state_rule: Rule | None = None,
) -> TrainState:
    """Shardings for a whole `TrainState` (step, params, opt_state, model_state) by `rule`.

    `params` are laid out by `rule` (paths relative to params, ``"Dense_0/kernel"``); every
    subtree of `opt_state` with the params' structure and shapes (Adam's `mu` and `nu`,
    momentum traces) takes the params' shardings, so an update needs no communication for
    the optimizer; the other optimizer leaves (counts, injected hyperparameters) get `rule`
    at their own path. `model_state` (BatchNorm statistics) gets `model_state_rule` (default
    `rule`). The step is replicated.

    Args:
      state: a `TrainState` (arrays or `jax.ShapeDtypeStruct`s), one model or K stacked
        (then use `stacked(...)` or `per_teacher(...)` rules).
      mesh: the mesh.
      rule: the rule for params and optimizer state.
      model_state_rule: the rule for `model_state` (default `rule`).

    Returns:
      A `TrainState` of `NamedSharding`s (for `sharded_step`, `jax.device_put`, and the
      abstract target of a checkpoint restore, `abstract_like`).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.parallel import fsdp, make_mesh, state_shardings
      >>> from mtkd_jax.training.state import init_train_state
      >>> state = init_train_state({"w": jnp.zeros((16, 8))}, optax.adam(1e-3))
      >>> s = state_shardings(state, make_mesh(2, 4), fsdp(min_size=1))
      >>> s.params["w"].spec, s.opt_state[0].mu["w"].spec, s.step.spec
      (P('model',), P('model',), P())
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"`state` must be a mtkd_jax TrainState, got {type(state).__name__}.")
    params = tree_shardings(state.params, mesh, rule, prefix="params/")
    is_like = _like(state.params)

    def opt(path, node):
        if is_like(node):
            return params
        # A leaf that is not a params-shaped moment (a count, a hyperparameter): the rule
        # sees its path within the optimizer state.
        name, shape = _path_str(path), _shape(node)
        return NamedSharding(mesh, _checked(rule(name, shape, mesh), shape, mesh,
                                            f"`opt_state/{name}`"))

    opt_state = jax.tree_util.tree_map_with_path(opt, state.opt_state, is_leaf=is_like)
    model_state = tree_shardings(
        state.model_state, mesh, rule if model_state_rule is None else model_state_rule,
        prefix="model_state/",
    )
    return TrainState(NamedSharding(mesh, P()), params, opt_state, model_state)
