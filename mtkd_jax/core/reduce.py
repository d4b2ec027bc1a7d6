"""Means over the global batch that give the same result on 1 device and per device.

A step built with `axis_name=None` is compiled over the global batch; built with a mapped
axis name (inside `jax.shard_map` or a user's `jax.pmap`) it sees one device's slice and
must average over the devices itself. These functions are written so that both give the
same numbers and the same gradients, however masked examples fall across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["global_mean", "masked_sum", "global_count", "normalize", "combine_masks", "pmean",
           "as_varying"]


def _expand(w: jax.Array, ndim: int) -> jax.Array:
    return w.reshape(w.shape + (1,) * (ndim - w.ndim))


def masked_sum(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    r"""This device's weighted sum over the leading (batch or token) axes: :math:`\sum w v`.

    `weights` of shape `values.shape[:n]` (`[B]` for examples, `[B, L]` for the tokens of a
    sequence batch) sum out the first n axes; None sums the leading axis with weight 1.
    Positions with weight 0 add exactly 0, whatever their values (NaN padding included), and
    pass no gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.reduce import masked_sum
      >>> masked_sum(jnp.array([[1.0, jnp.nan], [2.0, 3.0]]), jnp.array([[1, 0], [1, 1]]))
      Array(6., dtype=float32)
    """
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)  # e.g. boolean "correct" flags
    if weights is None:
        return jnp.tensordot(jnp.ones(values.shape[:1], values.dtype), values, axes=(0, 0))
    w = jnp.asarray(weights, values.dtype)
    if w.shape != values.shape[: w.ndim]:
        raise ValueError(
            f"`weights` {w.shape} must match the leading axes of `values` {values.shape}."
        )
    values = jnp.where(_expand(w, values.ndim) > 0, values, 0)
    return jnp.tensordot(w, values, axes=w.ndim)


def global_count(weights: jax.Array, *, axis_name=None) -> jax.Array:
    """The summed weight (e.g. valid tokens) of the global batch, psum'ed over `axis_name`,
    gradient-free (a mask sum).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.reduce import global_count
      >>> global_count(jnp.array([[1, 0], [1, 1]]))
      Array(3., dtype=float32)
    """
    w = jnp.asarray(weights)
    count = jnp.sum(w.astype(jnp.result_type(w.dtype, jnp.float32)))
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    return jax.lax.stop_gradient(count)


def normalize(local_sum: jax.Array, count: jax.Array, *, axis_name=None) -> jax.Array:
    r"""`local_sum / count` for a global `count`, written to be pmean'd.

    With `axis_name` over D devices each device returns :math:`D \cdot \text{local} /
    \text{count}`, so the pmean (of the values and of their gradients) is the sum over all
    devices divided by the global count: the numerator and denominator are summed separately,
    and a data-parallel step equals the single-device one however padding falls. A zero
    count gives 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.reduce import normalize
      >>> normalize(jnp.float32(3.0), jnp.float32(2.0))
      Array(1.5, dtype=float32)
    """
    scale = 1.0 if axis_name is None else jax.lax.axis_size(axis_name)
    count = jnp.asarray(count, jnp.result_type(local_sum))
    return scale * local_sum / jnp.maximum(count, jnp.finfo(count.dtype).tiny)


def combine_masks(mask: jax.Array | None, label_mask: jax.Array | None):
    """The positions that count for a labeled term: `mask` (padding, `[B, L]`) times
    `label_mask` (`[B]` per example or `[B, L]` per token); None when both are None.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.reduce import combine_masks
      >>> combine_masks(jnp.array([[1, 1], [1, 0]]), jnp.array([1, 0])).tolist()
      [[1.0, 1.0], [0.0, 0.0]]
    """
    if mask is None:
        return label_mask
    m = jnp.asarray(mask, jnp.float32)
    if label_mask is None:
        return m
    lm = jnp.asarray(label_mask, jnp.float32)
    return m * _expand(lm, m.ndim)


def global_mean(values: jax.Array, weights: jax.Array | None = None, *, axis_name=None):
    r"""Weighted mean over the batch axis of the global batch, written to be pmean'd.

    Without `axis_name`: :math:`\sum_b w_b v_b / \sum_b w_b` over the leading axis (over the
    leading `weights.ndim` axes for `[B, L]` token weights). With `axis_name` (inside
    `shard_map`/`pmap` over D devices), each device returns
    :math:`D \sum_{b \in \text{device}} w_b v_b / \sum_{\text{all } b} w_b`, so that
    `jax.lax.pmean` of the per-device values, and of their gradients, is the global weighted
    mean even when devices hold different numbers of weighted (e.g. labeled) examples.
    A zero total weight gives 0. It is `normalize(masked_sum(values, weights), count)`.

    Args:
      values: `[B, ...]`.
      weights: optional `[B]` (or `[B, L]`) non-negative weights (e.g. a label or padding
        mask), None for all ones over the leading axis.
      axis_name: the mapped data axis, or None.

    Returns:
      `[...]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.reduce import global_mean
      >>> global_mean(jnp.array([1.0, 2.0, 6.0]), jnp.array([1.0, 1.0, 0.0]))
      Array(1.5, dtype=float32)
    """
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(values.shape[:1], values.dtype)
    w = jnp.asarray(weights, values.dtype)
    # The count carries no gradient (it is a mask sum), so dividing by it keeps the gradient
    # of the pmean equal to the gradient of the global mean.
    count = global_count(w, axis_name=axis_name)
    return normalize(masked_sum(values, w), count, axis_name=axis_name)


def pmean(tree, axis_name):
    """`jax.lax.pmean(tree, axis_name)`, or `tree` unchanged when `axis_name` is None.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.reduce import pmean
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
      >>> from mtkd_jax.core.reduce import as_varying
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
