"""Layers and small functions shared by the reference models (Linen now, NNX alike).

Pooling without `reduce_window` (`max_pool_2x2`, `global_avg_pool`), the image-shape check
(`as_images`) and the float32 cast of the logits (`float32_logits`): plain functions over
arrays, usable from any module system.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Dtype", "as_images", "float32_logits", "global_avg_pool", "max_pool_2x2"]

Dtype = Any
"""A compute dtype (`jnp.float32`, `jnp.bfloat16`, ...)."""


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Max pooling with window 2 and stride 2 on every spatial axis, by reshape and max.

    Equal to `flax.linen.max_pool(x, (2,) * s, strides=(2,) * s)` (VALID padding: an odd
    trailing row/column is dropped), forward and gradient wherever the maxima are unique. It
    lowers to a reshape and a reduce instead of `reduce_window`, whose gradient
    (`select_and_scatter`) is slow on a CPU (see `benchmarks/`). At ties the gradient is
    shared equally among the tied entries (`reduce_window`'s gradient picks one); after a ReLU
    such ties are zeros whose ReLU gradient is 0 anyway.

    Args:
      x: `[B, *spatial, F]` with one or two spatial axes, e.g. `[B, H, W, F]` or `[B, L, F]`.

    Returns:
      `[B, *(s // 2 for s in spatial), F]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import max_pool_2x2
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> max_pool_2x2(x)[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    if x.ndim not in (3, 4):
        raise ValueError(
            f"`x` must be [B, L, F] or [B, H, W, F] (one or two spatial axes), got shape {x.shape}."
        )
    spatial = x.shape[1:-1]
    if any(s < 2 for s in spatial):
        raise ValueError(f"`x` needs spatial sizes >= 2 to pool by 2, got shape {x.shape}.")
    even = tuple(s - s % 2 for s in spatial)
    x = x[(slice(None), *(slice(0, e) for e in even))]
    b, f = x.shape[0], x.shape[-1]
    split = [d for e in even for d in (e // 2, 2)]
    x = x.reshape(b, *split, f)
    window_axes = tuple(2 + 2 * i for i in range(len(spatial)))
    return jnp.max(x, axis=window_axes)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: `[B, *spatial, F] -> [B, F]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import global_avg_pool
      >>> global_avg_pool(jnp.ones((2, 3, 3, 4))).shape
      (2, 4)
    """
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def as_images(x: jax.Array) -> jax.Array:
    """`[B, H, W]` (grayscale without a channel axis) or `[B, H, W, C]` -> `[B, H, W, C]`."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"`x` must be images [B, H, W, C] or [B, H, W], got shape {x.shape}.")
    return x


def float32_logits(x: jax.Array) -> jax.Array:
    """A model's output as float32 logits, whatever its compute dtype.

    Losses take log_softmax of the logits: keep that in float32 even for bfloat16 models.
    """
    return x.astype(jnp.float32)
