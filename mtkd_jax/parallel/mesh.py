"""Meshes and placement: the one mesh builder of the library, and putting arrays on a mesh.

`make_mesh()` is the one-axis `("data",)` mesh of data parallelism over every device;
`make_mesh(data, model)` the 2-D `("data", "model")` mesh of sharded parameters. Axes are
`Auto` on purpose: `jax.make_mesh` defaults to `Explicit` axes in this JAX version, under which
unsharded inputs to `jax.shard_map` raise. `place(tree, mesh)` replicates a pytree on every
device of a mesh (`P()`), `place(tree, shardings)` lays it out leaf by leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["make_mesh", "place", "mesh_of"]


def make_mesh(
    data: int | None = None,
    model: int | None = None,
    *,
    devices: Sequence[Any] | None = None,
    axis_names: tuple[str, ...] | None = None,
) -> Mesh:
    """A `("data",)` mesh (no `model`) or a 2-D `data x model` mesh over `devices`.

    The batch is split over the first axis, parameters (with `model`) over the second.

    Args:
      data: size of the data axis; None (one axis only) for every device of `devices`.
      model: size of the model axis (FSDP or tensor-parallel shards of each weight), or None
        for a one-axis mesh.
      devices: the devices, or None for `jax.devices()` (all devices of all processes; with
        `model` there must then be exactly data * model of them).
      axis_names: the axis names, default ``("data",)`` or ``("data", "model")``.

    Returns:
      `jax.sharding.Mesh`.

    Example:
      >>> import jax
      >>> from mtkd_jax.parallel import make_mesh
      >>> make_mesh(devices=jax.devices()[:1]).shape
      OrderedDict([('data', 1)])
      >>> make_mesh(1, 1, devices=jax.devices()[:1]).shape
      OrderedDict([('data', 1), ('model', 1)])
    """
    devices = jax.devices() if devices is None else list(devices)
    if model is None:
        if not devices:
            raise ValueError("`devices` must hold at least one device, got an empty sequence.")
        names = ("data",) if axis_names is None else tuple(axis_names)
        if len(names) != 1:
            raise ValueError(f"a one-axis mesh takes one axis name, got {axis_names!r}.")
        if data is not None and data != len(devices):
            raise ValueError(
                f"a data mesh of {data} devices needs {data} devices, got {len(devices)} "
                "(pass `devices`, or no `data`)."
            )
        return Mesh(np.asarray(devices), names, axis_types=(AxisType.Auto,))
    if data is None:
        raise ValueError("`data` (the size of the data axis) is needed with `model`.")
    for v, name in ((data, "data"), (model, "model")):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {v!r}.")
    if len(devices) != data * model:
        raise ValueError(
            f"a {data}x{model} mesh needs {data * model} devices, got {len(devices)} "
            "(pass `devices` or change the mesh shape)."
        )
    names = ("data", "model") if axis_names is None else tuple(axis_names)
    if len(names) != 2 or len(set(names)) != 2:
        raise ValueError(f"`axis_names` must be two distinct names, got {axis_names!r}.")
    return jax.make_mesh(
        (data, model), names, axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def place(tree: Any, where: Mesh | Any) -> Any:
    """Put `tree` on devices: replicated on every device of a mesh (`where` a `Mesh`: each
    leaf whole, `P()`), or leaf by leaf (`where` a pytree of shardings, as
    `jax.device_put`; no copy when a leaf is already there).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.parallel import fsdp, make_mesh, place, tree_shardings
      >>> place({"w": jnp.ones(3)}, make_mesh(devices=jax.devices()[:1]))["w"].sharding.spec
      P()
      >>> tree = {"w": jnp.zeros((8, 2))}
      >>> w = place(tree, tree_shardings(tree, make_mesh(2, 4), fsdp(min_size=1)))["w"]
      >>> w.addressable_shards[0].data.shape
      (2, 2)
    """
    if not isinstance(where, Mesh):
        return jax.device_put(tree, where)
    mesh = where
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
