r"""Distillation losses: per-example (unreduced, like optax's), and their masked batch mean.

Shapes: student logits `[..., C]`, targets `[..., C]` (probabilities), labels `[...]`.
Losses are float32 (or wider) whatever the models compute in: bfloat16 inputs are upcast
(`mtkd_jax.core.precision.at_least_float32`).

The hard/soft mix :math:`(1 - \alpha)\,\ell_{soft} + \alpha\,CE` is written once, in
`mix_losses`; `distillation_loss` is its per-example form and `mean_distillation_loss` the
batch mean the steps use (soft term over every example, CE over the labeled ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.example_losses import SOFT_LOSSES, cross_entropy, soft_kl, soft_mse
from mtkd_jax.core.reduce import combine_masks, global_count, global_mean, masked_sum, normalize

__all__ = [
    "soft_mse",
    "soft_kl",
    "cross_entropy",
    "mix_losses",
    "distillation_loss",
    "LossParts",
    "LossSums",
    "distillation_sums",
    "finish_loss",
    "mean_cross_entropy",
    "mean_distillation_loss",
    "per_teacher_soft_kl",
    "SOFT_LOSSES",
]


def mix_losses(soft: jax.Array, hard: jax.Array, *, alpha: float | jax.Array) -> jax.Array:
    r"""The hard/soft mix :math:`(1-\alpha)\,\ell_{soft} + \alpha\,\ell_{hard}`.

    The one place the mix is written (steps, codistillation and `distillation_loss` use it).

    Args:
      soft: soft (distillation) loss, any shape.
      hard: hard-label loss, broadcastable against `soft`.
      alpha: weight of the hard-label term, in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import mix_losses
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
      >>> from mtkd_jax.core.losses import distillation_loss
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
    mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Mean CE over the labeled examples (tokens) of the global batch (`reduce.global_mean`).

    Args:
      logits: `[B, C]` (`[B, L, V]` for sequences).
      labels: `[B]` (`[B, L]`) int labels; rows with `label_mask` 0 may hold anything.
      label_mask: optional `[B]` (or `[B, L]`), 1 for labeled rows.
      mask: optional `[B, L]` padding mask of a sequence batch (0 = padding).
      axis_name: the mapped data axis of a per-device step, or None.

    Returns:
      `[]`, 0 when no row is labeled.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import mean_cross_entropy
      >>> z = jnp.array([[0.0, 0.0], [9.0, -9.0]])
      >>> mean_cross_entropy(z, jnp.array([0, -1]), label_mask=jnp.array([1, 0])).round(4)
      Array(0.6931, dtype=float32)
    """
    hard_mask = combine_masks(mask, label_mask)
    ce = cross_entropy(logits, _safe_labels(labels, hard_mask))
    return global_mean(ce, hard_mask, axis_name=axis_name)


class LossSums(NamedTuple):
    """This device's sums of the two loss terms and the weights they are divided by.

    Attributes:
      soft: summed soft loss over the counted positions (examples or valid tokens).
      hard: summed CE over the labeled positions.
      soft_count: the number (summed weight) of positions in `soft`.
      hard_count: the number of positions in `hard`.
    """

    soft: jax.Array
    hard: jax.Array
    soft_count: jax.Array
    hard_count: jax.Array


def distillation_sums(
    student_logits: jax.Array,
    targets: jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 1.0,
    soft_loss: str = "kl",
    label_mask: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> LossSums:
    r"""The two terms of the distillation loss as sums over this device's positions.

    Sums (not means) add exactly across the chunks of a sequence (`mtkd_jax.objective.loss`)
    and across devices; `finish_loss` divides them by the global counts.

    Args:
      student_logits: `[B, C]` or `[B, L, V]`.
      targets: same shape, target probabilities (held fixed).
      labels: optional `[B]` / `[B, L]` int labels.
      temperature: T > 0.
      soft_loss: a name in `SOFT_LOSSES`.
      label_mask: optional `[B]` (or `[B, L]`), 1 for labeled positions.
      mask: optional `[B, L]` padding mask (0 = padding: in neither term).

    Returns:
      `LossSums`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import distillation_sums
      >>> s = distillation_sums(jnp.zeros((1, 2, 2)), jnp.full((1, 2, 2), 0.5),
      ...                       jnp.array([[0, 1]]), mask=jnp.array([[1, 0]]))
      >>> float(s.soft), round(float(s.hard), 4), float(s.soft_count)
      (0.0, 0.6931, 1.0)
    """
    soft_fn = _check_soft_loss(soft_loss)
    targets = jax.lax.stop_gradient(targets)
    soft_vals = soft_fn(student_logits, targets, temperature=temperature)
    if mask is None and soft_vals.ndim > 1:
        mask = jnp.ones(soft_vals.shape, soft_vals.dtype)  # every token counts
    soft_w = None if mask is None else jnp.asarray(mask, soft_vals.dtype)
    soft = masked_sum(soft_vals, soft_w)
    soft_count = (jnp.asarray(soft_vals.shape[0], soft_vals.dtype) if soft_w is None
                  else global_count(soft_w))
    if labels is None:
        zero = jnp.zeros((), soft.dtype)
        return LossSums(soft, zero, soft_count, zero)
    hard_mask = combine_masks(mask, label_mask)
    ce = cross_entropy(student_logits, _safe_labels(labels, hard_mask))
    hard_w = None if hard_mask is None else jnp.asarray(hard_mask, ce.dtype)
    hard = masked_sum(ce, hard_w)
    hard_count = (jnp.asarray(ce.shape[0], ce.dtype) if hard_w is None
                  else global_count(hard_w))
    return LossSums(soft, hard, soft_count, hard_count)


def finish_loss(
    sums: LossSums, *, alpha: float | jax.Array = 0.0, axis_name: str | None = None
) -> LossParts:
    r"""Divide `LossSums` by the global counts (psum'ed over `axis_name`) and mix them.

    With `axis_name` the counts are summed over the devices and every device returns
    `reduce.normalize`'s scaled share, so the pmean of the loss and of its gradients is the
    single-device value.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import LossSums, finish_loss
      >>> sums = LossSums(*map(jnp.float32, (2.0, 3.0, 4.0, 1.0)))
      >>> [float(v) for v in finish_loss(sums, alpha=0.5)]
      [1.75, 0.5, 3.0]
    """
    _checks.check_unit_interval(alpha, "alpha")
    soft_count, hard_count = sums.soft_count, sums.hard_count
    if axis_name is not None:
        soft_count = jax.lax.psum(soft_count, axis_name)
        hard_count = jax.lax.psum(hard_count, axis_name)
    soft = normalize(sums.soft, jax.lax.stop_gradient(soft_count), axis_name=axis_name)
    hard = normalize(sums.hard, jax.lax.stop_gradient(hard_count), axis_name=axis_name)
    return LossParts(mix_losses(soft, hard, alpha=alpha), soft, hard)


def mean_distillation_loss(
    student_logits: jax.Array,
    targets: jax.Array,
    labels: jax.Array | None = None,
    *,
    alpha: float | jax.Array = 0.0,
    temperature: float | jax.Array = 1.0,
    soft_loss: str = "kl",
    label_mask: jax.Array | None = None,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> LossParts:
    r"""The distillation loss of a batch: soft mean over all examples, CE over labeled ones.

    :math:`(1-\alpha)\,\overline{\ell_{soft}(s, t)} + \alpha\,\overline{CE(s, y)}_{labeled}`,
    each mean over the global batch (`distillation_sums` then `finish_loss`), so a per-device
    step (`axis_name`) pmean'd over the devices equals the single-device step however the
    labeled examples (or padding tokens) fall. For sequences (`[B, L, V]` logits, `mask`
    `[B, L]`) both means are over the valid tokens of the global batch. This is the loss of
    `mtkd_jax.training.steps.make_distill_step`.

    Args:
      student_logits: `[B, C]` or `[B, L, V]`.
      targets: same shape, target probabilities (held fixed: no gradient flows into them).
      labels: optional `[B]` (`[B, L]`) int labels (needed unless `alpha` is a concrete 0).
      alpha: hard-label weight in [0, 1].
      temperature: T > 0.
      soft_loss: a name in `SOFT_LOSSES`.
      label_mask: optional `[B]` (or `[B, L]`), 1 for labeled examples.
      mask: optional `[B, L]` padding mask (0 = padding, counted in neither term).
      axis_name: the mapped data axis of a per-device step, or None.

    Returns:
      `LossParts(loss, soft, hard)`, scalars.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import mean_distillation_loss
      >>> s = jnp.zeros((2, 2)); t = jnp.full((2, 2), 0.5); y = jnp.array([0, 1])
      >>> parts = mean_distillation_loss(s, t, y, alpha=0.5, label_mask=jnp.array([1, 0]))
      >>> [round(float(v), 4) for v in parts]
      [0.3466, 0.0, 0.6931]
    """
    _check_soft_loss(soft_loss)
    _checks.check_unit_interval(alpha, "alpha")
    if labels is None and not _checks.is_concrete_zero(alpha):
        raise ValueError(
            "`alpha` > 0 (the hard-label weight) needs labels (batch['y'])."
        )
    sums = distillation_sums(student_logits, targets, labels, temperature=temperature,
                             soft_loss=soft_loss, label_mask=label_mask, mask=mask)
    return finish_loss(sums, alpha=alpha, axis_name=axis_name)


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
      >>> from mtkd_jax.core.losses import per_teacher_soft_kl
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
