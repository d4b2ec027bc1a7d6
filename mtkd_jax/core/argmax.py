"""Whether an index is the argmax along the last axis, without computing the argmax.

`jnp.argmax` lowers to one variadic (value, index) reduction, which XLA:CPU runs as a scalar
loop, many times slower than a `jnp.max` of the same array; a distillation step asks it for
its accuracy (is the true token the student's argmax?) and its agreement (is the fused
target's argmax the student's?). `is_argmax` answers such a question with one boolean `any`
over the axis, which fuses with the array's producer and vectorises (benchmarks/RESULTS.md,
"Where the rest of the step went").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["is_argmax"]


def is_argmax(x: jax.Array, index: jax.Array) -> jax.Array:
    r"""`jnp.argmax(x, axis=-1) == index`, exactly: `[..., C]`, int `[...]` -> bool `[...]`.

    True where entry `index` is the first maximal entry of its row:
    :math:`\neg\exists j:\ x_j > x_i \lor (x_j = x_i \land j < i)`; a row holding a NaN is
    true only at its first NaN (as `jnp.argmax`, which returns it), and an index outside
    `[0, C)` is never the argmax.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.argmax import is_argmax
      >>> x = jnp.array([[0.0, 2.0, 2.0], [1.0, jnp.nan, 3.0]])
      >>> is_argmax(x, jnp.array([1, 1])).tolist(), is_argmax(x, jnp.array([2, 2])).tolist()
      ([True, True], [False, False])
    """
    x, index = jnp.asarray(x), jnp.asarray(index)
    if x.ndim == 0 or index.shape != x.shape[:-1]:
        raise ValueError(f"`index` must have the shape of `x` {jnp.shape(x)} without its last "
                         f"axis, got {index.shape}.")
    n = x.shape[-1]
    inside = (index >= 0) & (index < n)
    i = jnp.where(inside, index, 0)[..., None]
    xi = jnp.take_along_axis(x, i, axis=-1)
    before = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) < i
    beaten = (x > xi) | ((x == xi) & before)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        beaten = beaten | (jnp.isnan(x) & (before | ~jnp.isnan(xi)))
    return inside & ~jnp.any(beaten, axis=-1)
