"""Augmented views that the cache can serve: each input reproducible from `(index, view)`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["augment_view"]


def augment_view(
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array],
    key: jax.Array,
    x: jax.Array,
    index: jax.Array,
    view: jax.Array | int,
) -> jax.Array:
    """View `view` of each example, reproducible from `(key, index, view)` alone.

    Example i gets `augment_fn(fold_in(fold_in(key, index[i]), view[i]), x[i:i+1])`, so the
    cache build and every later epoch see the same input for the same (index, view),
    whatever the batch composition. Jit-safe.

    Args:
      augment_fn: `(key, x [1, ...]) -> [1, ...]`, e.g. `mtkd_jax.data.augment`.
      key: a PRNG key fixed for the run.
      x: `[B, ...]` inputs.
      index: `[B]` integer example indices.
      view: a scalar or `[B]` integer view numbers.

    Returns:
      `[B, ...]` augmented inputs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.cache import augment_view
      >>> noise = lambda k, x: x + jax.random.normal(k, x.shape)
      >>> x = jnp.zeros((3, 2))
      >>> a = augment_view(noise, jax.random.key(0), x, jnp.array([5, 6, 7]), 1)
      >>> b = augment_view(noise, jax.random.key(0), x[1:], jnp.array([6, 7]), 1)
      >>> bool(jnp.all(a[1:] == b))
      True
    """
    index = jnp.asarray(index)
    view = jnp.asarray(view)
    b = jnp.shape(x)[0] if jnp.ndim(x) else None
    for value, name in ((index, "index"), (view, "view")):
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"`{name}` must be integers, got dtype {value.dtype}.")
    if index.shape != (b,):
        raise ValueError(
            f"`index` must be [B] with B={b} (the batch of `x` {jnp.shape(x)}), got shape "
            f"{index.shape}."
        )
    if view.shape not in ((), (1,), (b,)):
        raise ValueError(f"`view` must be a scalar or [B]=({b},), got shape {view.shape}.")
    view = jnp.broadcast_to(view, index.shape)

    def one(i, v, xi):
        k = jax.random.fold_in(jax.random.fold_in(key, i), v)
        return augment_fn(k, xi[None])[0]

    return jax.vmap(one)(index, view, x)
