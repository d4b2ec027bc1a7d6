"""Means over the global batch that give the same result on 1 device and per device.

A step built with `axis_name=None` is compiled over the global batch; built with a mapped
axis name (inside `jax.shard_map` or a user's `jax.pmap`) it sees one device's slice and
must average over the devices itself. These functions are written so that both give the
same numbers and the same gradients, however masked examples fall across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["global_mean", "pmean", "as_varying"]


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
      >>> from mtkd_jax.reduce import global_mean
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


def pmean(tree, axis_name):
    """`jax.lax.pmean(tree, axis_name)`, or `tree` unchanged when `axis_name` is None.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.reduce import pmean
      >>> pmean({"loss": jnp.ones(())}, None)["loss"]
      Array(1., dtype=float32)
    """
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


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
      >>> from mtkd_jax.reduce import as_varying
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
