"""The index of the largest entry along the last axis, as `jnp.argmax`, in blocks.

`jnp.argmax` lowers to one variadic (value, index) reduction, which XLA:CPU runs as a scalar
loop: over `[B, L, V]` logits at V = 8192 it costs ~35x a `jnp.max` of the same array, and a
distillation step takes several (accuracy, agreement with the fused target). `argmax`
splits the vocabulary axis into blocks: the block maxima (a plain max reduction, vectorised),
the first block that holds the largest, then `jnp.argmax` within that one block only: the
first maximal entry, as `jnp.argmax(x, axis=-1)` (ties included). An array holding a NaN
takes `jnp.argmax` whole (a `lax.cond`), so the first NaN is returned there too.
benchmarks/lm_profile.py times the steps that use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["argmax"]

_MIN_BLOCKED = 512
"""Below this many entries along the axis, `jnp.argmax` itself (the blocks would not pay)."""


def _block_size(n: int) -> int | None:
    """The divisor of n closest to 64 in [8, 512], or None (then `jnp.argmax` is used)."""
    if n < _MIN_BLOCKED:
        return None
    divisors = [b for b in range(8, 513) if n % b == 0]
    return min(divisors, key=lambda b: abs(b - 64)) if divisors else None


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)`, computed by blocks of the last axis: `[..., C]` -> int32 `[...]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.argmax import argmax
      >>> x = jnp.zeros((2, 1024)).at[0, 700].set(1.0).at[1, 3].set(jnp.nan)
      >>> argmax(x).tolist()
      [700, 3]
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("`x` must have at least one axis (the one to take the argmax over).")
    n = x.shape[-1]
    b = _block_size(n)
    if b is None:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    def blocked(x):
        blocks = x.reshape(x.shape[:-1] + (n // b, b))
        j = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1).astype(jnp.int32)
        block = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]
        return j * b + jnp.argmax(block, axis=-1).astype(jnp.int32)

    if not jnp.issubdtype(x.dtype, jnp.floating):
        return blocked(x)
    # XLA:CPU's max reduction does not propagate NaN (it may return any entry of a block
    # that holds one), so an array with a NaN takes `jnp.argmax` whole: the first NaN.
    whole = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(jnp.any(jnp.isnan(x)), whole, blocked, x)
