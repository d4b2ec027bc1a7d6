"""Stacked pytrees: K same-structure param pytrees held as one, teacher axis first.

A stacked pytree has a leading K axis on every leaf (`[K, *leaf.shape]`). `num_stacked` is
the one place that reads and checks that K; `stack_params` and `unstack_params` convert
between K pytrees and one stacked pytree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["num_stacked", "stack_params", "unstack_params"]


def num_stacked(tree: Any, name: str = "stacked") -> int:
    """K, the common leading axis of every leaf of a stacked pytree `[K, ...]`.

    Reads only shapes, so it works on concrete arrays, tracers and `jax.ShapeDtypeStruct`s
    alike (once per trace under `jax.jit`).

    Args:
      tree: a pytree whose leaves all have the same leading dimension K.
      name: the argument's name, used in error messages.

    Returns:
      K.

    Raises:
      ValueError: `tree` is None or has no array leaves, a leaf is a scalar, or the leaves
        disagree on K.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import num_stacked
      >>> num_stacked({"w": jnp.zeros((3, 4, 2)), "b": jnp.zeros((3, 2))})
      3
    """
    if tree is None:
        raise ValueError(
            f"`{name}` is None; expected a stacked pytree [K, ...] (every leaf with a leading "
            "teacher axis K)."
        )
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; expected a stacked pytree [K, ...].")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} is a scalar; every leaf of a "
                "stacked pytree needs a leading teacher axis [K, ...]."
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        found = ", ".join(f"{k} at {p}" for k, p in sizes.items())
        raise ValueError(f"`{name}` leaves disagree on the leading teacher axis K: {found}.")
    return next(iter(sizes))


def stack_params(params_list: Sequence[Any]) -> Any:
    """Stack K same-structure param pytrees into one with a leading teacher axis.

    Args:
      params_list: K >= 1 pytrees of identical structure and leaf shapes.

    Returns:
      One pytree whose leaves are `[K, *leaf.shape]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import stack_params
      >>> stack_params([{"w": jnp.zeros(3)}, {"w": jnp.ones(3)}])["w"].shape
      (2, 3)
    """
    if isinstance(params_list, Mapping) or not isinstance(params_list, Sequence):
        raise TypeError(
            f"`params_list` must be a list or tuple of K param pytrees, got "
            f"{type(params_list).__name__}."
        )
    if not params_list:
        raise ValueError("`params_list` is empty; need at least one teacher's params.")
    ref_def = jax.tree.structure(params_list[0])
    ref_shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params_list[0])]
    for k, params in enumerate(params_list[1:], start=1):
        if jax.tree.structure(params) != ref_def:
            raise ValueError(
                f"`params_list[{k}]` has a different pytree structure from "
                f"`params_list[0]`; same-architecture teachers are required (use "
                "`make_heterogeneous_apply` for mixed architectures)."
            )
        shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params)]
        if shapes != ref_shapes:
            bad = next(i for i, (a, b) in enumerate(zip(shapes, ref_shapes, strict=True)) if a != b)
            raise ValueError(
                f"`params_list[{k}]` leaf {bad} has shape {shapes[bad]} but "
                f"`params_list[0]` has {ref_shapes[bad]}."
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def unstack_params(stacked: Any) -> list[Any]:
    """Split a stacked pytree `[K, ...]` into a list of K pytrees (inverse of `stack_params`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import unstack_params
      >>> [p["w"].tolist() for p in unstack_params({"w": jnp.array([[1, 2], [3, 4]])})]
      [[1, 2], [3, 4]]
    """
    k = num_stacked(stacked, "stacked")
    return [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(k)]
