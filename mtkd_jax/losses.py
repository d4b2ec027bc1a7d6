"""Per-example distillation losses (unreduced, like optax's losses: the caller reduces).

Shapes: student logits `[..., C]`, targets `[..., C]` (probabilities), labels `[...]`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import _checks
from mtkd_jax.divergence import log_softmax_t, softmax_t

__all__ = [
    "soft_mse",
    "soft_kl",
    "cross_entropy",
    "distillation_loss",
    "per_teacher_soft_kl",
    "SOFT_LOSSES",
]


def _check_pair(student_logits, targets):
    """Check a `[..., C]` pair and return both as arrays."""
    student_logits, targets = jnp.asarray(student_logits), jnp.asarray(targets)
    _checks.check_float(student_logits, "student_logits")
    _checks.check_float(targets, "targets")
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
      >>> from mtkd_jax.losses import soft_mse
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
    across temperatures. Computed in log space.

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` target probabilities (already at temperature T).
      temperature: T > 0 applied to the student, and the `T^2` factor.

    Returns:
      `[...]` per-example loss, >= 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import soft_kl
      >>> soft_kl(jnp.zeros(2), jnp.array([0.5, 0.5]), temperature=4.0)
      Array(0., dtype=float32)
    """
    student_logits, targets = _check_pair(student_logits, targets)
    log_q = log_softmax_t(student_logits, temperature=temperature)
    safe_t = jnp.where(targets > 0, targets, 1.0)
    kl = jnp.sum(jnp.where(targets > 0, targets * (jnp.log(safe_t) - log_q), 0.0), axis=-1)
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
      >>> from mtkd_jax.losses import cross_entropy
      >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2])).round(4)
      Array([1.3863], dtype=float32)
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _checks.check_float(logits, "logits")
    _checks.check_labels(labels, "labels", logits.shape[:-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


SOFT_LOSSES: dict[str, Callable[..., jax.Array]] = {"kl": soft_kl, "mse": soft_mse}
"""Name -> soft loss `fn(student_logits, targets, *, temperature) -> [...]`."""


def distillation_loss(
    student_logits: jax.Array,
    targets: jax.Array,
    labels: jax.Array | None = None,
    *,
    alpha: float | jax.Array = 0.0,
    temperature: float | jax.Array = 1.0,
    soft_loss: str = "kl",
) -> jax.Array:
    r"""Hard-label CE mixed with a soft loss: :math:`\alpha\,CE(s, y) + (1-\alpha)\,\ell_{soft}`.

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` teacher target probabilities.
      labels: `[...]` integer labels; needed when `alpha` is not exactly 0.
      alpha: weight of the hard-label term, in [0, 1].
      temperature: T > 0 for the soft term.
      soft_loss: ``"kl"`` (`soft_kl`, with the T^2 factor) or ``"mse"`` (`soft_mse`).

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import distillation_loss
      >>> s = jnp.zeros((1, 2)); t = jnp.array([[0.5, 0.5]]); y = jnp.array([0])
      >>> distillation_loss(s, t, y, alpha=0.5, temperature=2.0).round(4)
      Array([0.3466], dtype=float32)
    """
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    concrete = not _checks.is_traced(alpha)
    if concrete and not bool(np.all((np.asarray(alpha) >= 0) & (np.asarray(alpha) <= 1))):
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    soft = SOFT_LOSSES[soft_loss](student_logits, targets, temperature=temperature)
    if labels is None:
        if concrete and not np.any(np.asarray(alpha)):
            return soft
        raise ValueError(
            "`labels` ([...] integer class indices) are needed when `alpha` (the hard-label "
            f"weight) is not a concrete 0; got alpha={alpha}."
        )
    hard = cross_entropy(student_logits, labels)
    return alpha * hard + (1.0 - alpha) * soft


def per_teacher_soft_kl(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    weights: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    r"""Weighted mean of per-teacher KLs: :math:`\sum_k w_k\,T^2 KL(p_k \| q)`.

    This is how tools that "sum per-teacher losses" fuse teachers. Its gradient in the
    student logits equals that of `soft_kl(s, fuse_targets(p, w))` (the cross-entropy part is
    linear in the target), but its value is larger by a term that does not depend on the
    student, the teachers' generalized Jensen-Shannon divergence:
    :math:`\sum_k w_k KL(p_k\|q) = KL(\bar p\|q) + \sum_k w_k KL(p_k\|\bar p)`,
    :math:`\bar p = \sum_k w_k p_k`. Loss curves of the two are therefore not comparable.

    Args:
      student_logits: `[..., C]`.
      teacher_probs: `[K, ..., C]` at temperature T.
      weights: `[K]` or `[K, ...]` summing to 1 over K.
      temperature: T > 0.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import per_teacher_soft_kl
      >>> p = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
      >>> per_teacher_soft_kl(jnp.zeros((1, 2)), p, jnp.array([0.5, 0.5])).round(4)
      Array([0.6931], dtype=float32)
    """
    student_logits = jnp.asarray(student_logits)
    teacher_probs, weights = jnp.asarray(teacher_probs), jnp.asarray(weights)
    _checks.check_float(student_logits, "student_logits")
    _checks.check_teachers(teacher_probs, "teacher_probs")
    _checks.check_same_classes(
        student_logits.shape, teacher_probs.shape, "student_logits", "teacher_probs"
    )
    if student_logits.shape != teacher_probs.shape[1:]:
        raise ValueError(
            f"`student_logits` must have shape [..., C]={teacher_probs.shape[1:]}, the shape of "
            f"`teacher_probs` {teacher_probs.shape} without its teacher axis; got "
            f"{student_logits.shape}."
        )
    _checks.check_weights(weights, "weights", teacher_probs.shape, "teacher_probs")
    per = soft_kl(
        jnp.broadcast_to(student_logits, teacher_probs.shape), teacher_probs,
        temperature=temperature,
    )  # [K, ...]
    w = jnp.asarray(weights, per.dtype)
    w = w.reshape(w.shape + (1,) * (per.ndim - w.ndim))
    return jnp.sum(w * per, axis=0)
