"""Image augmentation inside the train step: random crop with padding and horizontal flip.

A pure JAX function of an explicit key, so it jits with the step and the caller decides who
sees which view. For distillation, augment once per step and feed the same augmented batch to
the student and every teacher ("patient and consistent" distillation, Beyer et al. 2022):
teachers that saw a different view would give targets for an image the student never saw.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

__all__ = ["augment"]


def augment(key: jax.Array, x: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop after zero padding, and random horizontal flip, per example.

    Each image is padded with `pad` zeros on every side and cropped back to `[H, W]` at a
    uniform random offset in `[0, 2 pad]^2` (a shift by up to `pad` pixels); then, if `flip`,
    mirrored left-right with probability 1/2. On normalised inputs the zero padding is the
    train mean. Do not flip digits or characters (`mnist5k`, `digits`, `mnist`): a mirrored
    digit is another glyph. Use `flip=info.flip` from the loaded dataset.

    Args:
      key: PRNG key, e.g. `jax.random.fold_in(key, step)`.
      x: `[B, H, W, C]` float images (NHWC).
      pad: pixels of padding (max shift), a static int >= 0; 0 turns cropping off.
      flip: whether to flip (static bool).

    Returns:
      `[B, H, W, C]`, same dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
      >>> y = jax.jit(augment, static_argnames=("pad", "flip"))(jax.random.key(0), x, pad=1)
      >>> y.shape, bool(jnp.all(augment(jax.random.key(0), x, pad=0, flip=False) == x))
      ((2, 4, 4, 1), True)
    """
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"`x` must be a batch of images [B, H, W, C] (NHWC), got shape {jnp.shape(x)}; "
            "1-D signals such as MNIST-1D are not augmented here."
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"`x` must be floating point, got dtype {jnp.result_type(x)}.")
    if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or pad < 0:
        raise ValueError(f"`pad` must be a static int >= 0, got {pad!r}.")
    if not isinstance(flip, bool):
        raise TypeError(f"`flip` must be a static Python bool, got {type(flip).__name__}.")
    b, h, w, c = x.shape
    crop_key, flip_key = jax.random.split(key)
    if pad:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
            padded, offsets
        )
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
    return x
