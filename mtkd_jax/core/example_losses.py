r"""Per-example losses (unreduced, like optax's): soft MSE, temperature-scaled KL and CE.

Shapes: student logits `[..., C]` (`[B, C]`, or `[B, L, V]` for the tokens of a sequence),
targets `[..., C]` (probabilities), labels `[...]`. Float32 (or wider) whatever the models
compute in. Re-exported by `mtkd_jax.core.losses`, which reduces them over batches.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.divergence import log_softmax_t, softmax_t
from mtkd_jax.core.precision import at_least_float32

__all__ = ["soft_mse", "soft_kl", "cross_entropy", "SOFT_LOSSES"]


def _check_pair(student_logits, targets):
    """Check a `[..., C]` pair and return both as arrays, at least float32."""
    student_logits, targets = jnp.asarray(student_logits), jnp.asarray(targets)
    _checks.check_float(student_logits, "student_logits")
    _checks.check_float(targets, "targets")
    student_logits, targets = at_least_float32(student_logits), at_least_float32(targets)
    _checks.check_same_classes(student_logits.shape, targets.shape, "student_logits", "targets")
    if student_logits.shape != targets.shape:
        raise ValueError(
            f"`student_logits` {student_logits.shape} and `targets` {targets.shape} must have the "
            "same shape [..., C]."
        )
    return student_logits, targets


def soft_mse(
    student_logits: jax.Array, targets: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    r"""The article's objective: squared error between probabilities, summed over classes.

    :math:`\ell = \sum_c (\mathrm{softmax}(s / T)_c - t_c)^2`.

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` target probabilities (e.g. `fuse_targets`).
      temperature: T > 0 applied to the student.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import soft_mse
      >>> soft_mse(jnp.zeros(2), jnp.array([1.0, 0.0]))
      Array(0.5, dtype=float32)
    """
    student_logits, targets = _check_pair(student_logits, targets)
    q = softmax_t(student_logits, temperature=temperature)
    return jnp.sum(jnp.square(q - targets), axis=-1)


def soft_kl(
    student_logits: jax.Array, targets: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    r"""Temperature-scaled KL (Hinton et al., 2015): :math:`T^2\,KL(t \| \mathrm{softmax}(s/T))`.

    :math:`\ell = T^2 \sum_c t_c (\log t_c - \log\mathrm{softmax}(s/T)_c)`, with terms where
    :math:`t_c = 0` contributing 0. The :math:`T^2` keeps gradient magnitudes comparable
    across temperatures (TextBrewer omits it: divide by :math:`T^2`, or scale its learning
    rate by :math:`T^2`, to compare). Computed in log space.

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` target probabilities (already at temperature T). A NaN target
        gives a NaN loss (it is not hidden by the zero-mass rule).
      temperature: T > 0 applied to the student, and the `T^2` factor.

    Returns:
      `[...]` per-example loss, >= 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import soft_kl
      >>> soft_kl(jnp.zeros(2), jnp.array([0.5, 0.5]), temperature=4.0)
      Array(0., dtype=float32)
    """
    student_logits, targets = _check_pair(student_logits, targets)
    log_q = log_softmax_t(student_logits, temperature=temperature)
    # No mass (<= 0: exact zeros, and rounding-level negatives of a fused target) adds 0; a
    # NaN target fails both comparisons and must show in the value, not only in the
    # gradient, so that a bad teacher is caught at the step that produced it.
    zero = targets <= 0
    safe_t = jnp.where(zero, 1.0, targets)
    kl = jnp.sum(jnp.where(zero, 0.0, targets * (jnp.log(safe_t) - log_q)), axis=-1)
    return jnp.square(temperature) * kl


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Cross-entropy with integer labels: :math:`-\log\mathrm{softmax}(z)_y`.

    Args:
      logits: `[..., C]`.
      labels: `[...]` integers in `[0, C)`.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import cross_entropy
      >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2])).round(4)
      Array([1.3863], dtype=float32)
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _checks.check_float(logits, "logits")
    _checks.check_labels(labels, "labels", logits.shape[:-1])
    logp = jax.nn.log_softmax(at_least_float32(logits), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


SOFT_LOSSES: dict[str, Callable[..., jax.Array]] = {"kl": soft_kl, "mse": soft_mse}
"""Name -> soft loss `fn(student_logits, targets, *, temperature) -> [...]`."""
