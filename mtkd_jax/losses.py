r"""Distillation losses: per-example (unreduced, like optax's), and their masked batch mean.

Shapes: student logits `[..., C]`, targets `[..., C]` (probabilities), labels `[...]`.
Losses are float32 (or wider) whatever the models compute in: bfloat16 inputs are upcast
(`mtkd_jax.precision.at_least_float32`).

The hard/soft mix :math:`(1 - \alpha)\,\ell_{soft} + \alpha\,CE` is written once, in
`mix_losses`; `distillation_loss` is its per-example form and `mean_distillation_loss` the
batch mean the steps use (soft term over every example, CE over the labeled ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtkd_jax import _checks
from mtkd_jax.divergence import log_softmax_t, softmax_t
from mtkd_jax.precision import at_least_float32
from mtkd_jax.reduce import global_mean

__all__ = [
    "soft_mse",
    "soft_kl",
    "cross_entropy",
    "mix_losses",
    "distillation_loss",
    "LossParts",
    "mean_cross_entropy",
    "mean_distillation_loss",
    "per_teacher_soft_kl",
    "SOFT_LOSSES",
]


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
      >>> from mtkd_jax.losses import soft_kl
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
      >>> from mtkd_jax.losses import cross_entropy
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


def mix_losses(soft: jax.Array, hard: jax.Array, *, alpha: float | jax.Array) -> jax.Array:
    r"""The hard/soft mix :math:`(1-\alpha)\,\ell_{soft} + \alpha\,\ell_{hard}`.

    The one place the mix is written (steps, codistillation and `distillation_loss` use it).

    Args:
      soft: soft (distillation) loss, any shape.
      hard: hard-label loss, broadcastable against `soft`.
      alpha: weight of the hard-label term, in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import mix_losses
      >>> float(mix_losses(jnp.float32(2.0), jnp.float32(4.0), alpha=0.25))
      2.5
    """
    _checks.check_unit_interval(alpha, "alpha")
    return (1.0 - alpha) * soft + alpha * hard


def _check_soft_loss(soft_loss) -> Callable[..., jax.Array]:
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    return SOFT_LOSSES[soft_loss]


def _safe_labels(labels, label_mask):
    """Unlabeled rows may hold placeholder labels (e.g. -1); index 0 keeps their CE finite."""
    return labels if label_mask is None else jnp.where(jnp.asarray(label_mask) > 0, labels, 0)


def distillation_loss(
    student_logits: jax.Array,
    targets: jax.Array,
    labels: jax.Array | None = None,
    *,
    alpha: float | jax.Array = 0.0,
    temperature: float | jax.Array = 1.0,
    soft_loss: str = "kl",
    label_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Per-example hard-label CE mixed with a soft loss: :math:`\alpha\,CE + (1-\alpha)\,\ell`.

    With `label_mask`, the CE term of unlabeled examples (mask 0) is 0: the plain mean of
    this per-example loss then weights the CE by the labeled fraction of the batch.
    `mean_distillation_loss` instead takes the CE mean over the labeled examples only (what
    the library's steps do).

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` teacher target probabilities.
      labels: `[...]` integer labels; needed when `alpha` is not exactly 0.
      alpha: weight of the hard-label term, in [0, 1].
      temperature: T > 0 for the soft term.
      soft_loss: ``"kl"`` (`soft_kl`, with the T^2 factor) or ``"mse"`` (`soft_mse`).
      label_mask: optional `[...]`, 1 for labeled examples.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import distillation_loss
      >>> s = jnp.zeros((1, 2)); t = jnp.array([[0.5, 0.5]]); y = jnp.array([0])
      >>> distillation_loss(s, t, y, alpha=0.5, temperature=2.0).round(4)
      Array([0.3466], dtype=float32)
    """
    soft_fn = _check_soft_loss(soft_loss)
    _checks.check_unit_interval(alpha, "alpha")
    soft = soft_fn(student_logits, targets, temperature=temperature)
    if labels is None:
        if _checks.is_concrete_zero(alpha):
            return soft
        raise ValueError(
            "`labels` ([...] integer class indices) are needed when `alpha` (the hard-label "
            f"weight) is not a concrete 0; got alpha={alpha}."
        )
    hard = cross_entropy(student_logits, _safe_labels(labels, label_mask))
    if label_mask is not None:
        hard = hard * jnp.asarray(label_mask, hard.dtype)
    return mix_losses(soft, hard, alpha=alpha)


class LossParts(NamedTuple):
    """A batch-mean loss and its two terms (scalars).

    Attributes:
      loss: `mix_losses(soft, hard, alpha=alpha)`.
      soft: mean soft loss over the examples.
      hard: mean CE over the labeled examples (0 without labels).
    """

    loss: jax.Array
    soft: jax.Array
    hard: jax.Array


def mean_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Mean CE over the labeled examples of the global batch (see `reduce.global_mean`).

    Args:
      logits: `[B, C]`.
      labels: `[B]` int labels; rows with `label_mask` 0 may hold anything.
      label_mask: optional `[B]`, 1 for labeled rows.
      axis_name: the mapped data axis of a per-device step, or None.

    Returns:
      `[]`, 0 when no row is labeled.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import mean_cross_entropy
      >>> z = jnp.array([[0.0, 0.0], [9.0, -9.0]])
      >>> mean_cross_entropy(z, jnp.array([0, -1]), label_mask=jnp.array([1, 0])).round(4)
      Array(0.6931, dtype=float32)
    """
    ce = cross_entropy(logits, _safe_labels(labels, label_mask))
    return global_mean(ce, label_mask, axis_name=axis_name)


def mean_distillation_loss(
    student_logits: jax.Array,
    targets: jax.Array,
    labels: jax.Array | None = None,
    *,
    alpha: float | jax.Array = 0.0,
    temperature: float | jax.Array = 1.0,
    soft_loss: str = "kl",
    label_mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> LossParts:
    r"""The distillation loss of a batch: soft mean over all examples, CE over labeled ones.

    :math:`(1-\alpha)\,\overline{\ell_{soft}(s, t)} + \alpha\,\overline{CE(s, y)}_{labeled}`,
    each mean over the global batch (`reduce.global_mean`), so a per-device step
    (`axis_name`) pmean'd over the devices equals the single-device step however the labeled
    examples fall. This is the loss of `mtkd_jax.steps.make_distill_step`.

    Args:
      student_logits: `[B, C]`.
      targets: `[B, C]` target probabilities (held fixed: no gradient flows into them).
      labels: optional `[B]` int labels (needed unless `alpha` is a concrete 0).
      alpha: hard-label weight in [0, 1].
      temperature: T > 0.
      soft_loss: a name in `SOFT_LOSSES`.
      label_mask: optional `[B]`, 1 for labeled examples.
      axis_name: the mapped data axis of a per-device step, or None.

    Returns:
      `LossParts(loss, soft, hard)`, scalars.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.losses import mean_distillation_loss
      >>> s = jnp.zeros((2, 2)); t = jnp.full((2, 2), 0.5); y = jnp.array([0, 1])
      >>> parts = mean_distillation_loss(s, t, y, alpha=0.5, label_mask=jnp.array([1, 0]))
      >>> [round(float(v), 4) for v in parts]
      [0.3466, 0.0, 0.6931]
    """
    soft_fn = _check_soft_loss(soft_loss)
    _checks.check_unit_interval(alpha, "alpha")
    targets = jax.lax.stop_gradient(targets)
    soft = global_mean(soft_fn(student_logits, targets, temperature=temperature),
                       axis_name=axis_name)
    if labels is None:
        if not _checks.is_concrete_zero(alpha):
            raise ValueError(
                "`alpha` > 0 (the hard-label weight) needs labels (batch['y'])."
            )
        hard = jnp.zeros((), soft.dtype)
    else:
        hard = mean_cross_entropy(student_logits, labels, label_mask=label_mask,
                                  axis_name=axis_name)
    return LossParts(mix_losses(soft, hard, alpha=alpha), soft, hard)


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
