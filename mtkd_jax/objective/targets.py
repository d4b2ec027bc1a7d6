"""Distillation targets from several teachers: fused, leave-one-out, and logit averaging.

Which fusion each function does, since tools mix these silently:

* `fuse_targets` averages **probabilities**: `t = sum_k w_k p_k` (this library's default; the
  article's mean target).
* `leave_one_out_targets` averages the probabilities of the **other** teachers, one target per
  model (the article's codistillation target).
* `fuse_logits` averages **raw logits** and then takes the softmax (TextBrewer's choice): a
  different function, equal to the probability mean only when all teachers agree.

A third way, the weighted mean of **per-teacher losses**, lives in `mtkd_jax.core.losses`
(`per_teacher_soft_kl`).

`distill_targets` is the whole way from teacher logits to what a student learns from:
softmax at T, teacher weights (`mtkd_jax.weighting`), fused target. The steps call it, so
precomputed teacher logits (a cache) give the same targets as teachers run online.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.class_sets import mask_unknown
from mtkd_jax.core.divergence import softmax_t
from mtkd_jax.core.precision import at_least_float32
from mtkd_jax.core.reduce import expand_to
from mtkd_jax.weighting import get_weighting

__all__ = [
    "fuse_targets",
    "leave_one_out_targets",
    "fuse_logits",
    "DistillTargets",
    "distill_targets",
    "restrict_weights",
]


def fuse_targets(probs: jax.Array, weights: jax.Array) -> jax.Array:
    r"""Weighted mean of teacher probabilities: :math:`t = \sum_k w_k p_k`.

    Args:
      probs: `[K, ..., C]` teacher probabilities.
      weights: `[K]` or `[K, ...]`, non-negative and summing to 1 over K (as returned by
        `mtkd_jax.weighting`); they are used as given, not renormalised. Concrete weights
        that are negative, NaN or do not sum to 1 are refused (ValueError); weights computed
        inside `jax.jit` cannot be inspected and are the caller's responsibility.

    Returns:
      `[..., C]` fused target distribution.

    Example (the article's worked example):
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import fuse_targets
      >>> p = jnp.array([[0.2, 0.3, 0.5], [0.1, 0.4, 0.5]])
      >>> [round(x, 4) for x in fuse_targets(p, jnp.array([0.5, 0.5])).tolist()]
      [0.15, 0.35, 0.5]
    """
    _checks.check_weight_values(weights, "weights")
    probs, weights = jnp.asarray(probs), jnp.asarray(weights)
    _checks.check_teachers(probs, "probs")
    _checks.check_weights(weights, "weights", probs.shape, "probs")
    w = expand_to(jnp.asarray(weights, probs.dtype), probs.ndim)
    # A sum of K terms (K is static and small) rather than a reduction over the teacher axis:
    # one elementwise fusion, so the weighted `[K, ..., C]` products are never held.
    return functools.reduce(jnp.add, [w[i] * probs[i] for i in range(probs.shape[0])])


def leave_one_out_targets(probs: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    r"""One target per teacher: the weighted mean of the **other** teachers.

    Row k is :math:`\sum_{j \ne k} w_j p_j / \sum_{j \ne k} w_j`, uniform weights when
    `weights` is None (the article's :math:`\frac{1}{N-1}\sum_{i \ne j} p_i`). Needs K >= 2.
    If every other teacher has zero weight, row k falls back to their uniform mean.

    Args:
      probs: `[K, ..., C]` teacher probabilities.
      weights: optional `[K]` or `[K, ...]` non-negative weights.

    Returns:
      `[K, ..., C]` leave-one-out targets.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import leave_one_out_targets
      >>> p = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
      >>> leave_one_out_targets(p)
      Array([[0.25, 0.75],
             [0.75, 0.25],
             [0.5 , 0.5 ]], dtype=float32)
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs", min_teachers=2)
    # Row k sums the other teachers directly, rather than subtracting teacher k's own term
    # from the total: when one teacher holds nearly all the weight, total - own is a
    # difference of nearly equal numbers and the ratio of two such differences can be far off
    # (even outside [0, 1]). K is small, so the [K, K, ...] intermediate is cheap; an
    # elementwise sum rather than a matmul keeps full float32 precision on every backend.
    others = 1.0 - jnp.eye(k, dtype=probs.dtype)

    def sum_others(x):  # [K, ..., 1 or C] -> same shape, row k = sum_{j != k} x_j
        return jnp.sum(others.reshape((k, k) + (1,) * (x.ndim - 1)) * x[None], axis=1)

    uniform = sum_others(probs) / (k - 1)
    if weights is None:
        return uniform
    weights = jnp.asarray(weights)
    _checks.check_weights(weights, "weights", probs.shape, "probs")
    w = expand_to(jnp.asarray(weights, probs.dtype), probs.ndim)
    w = jnp.broadcast_to(w, probs.shape[:-1] + (1,))
    num, den = sum_others(w * probs), sum_others(w)
    safe_den = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe_den, uniform)


def fuse_logits(
    teacher_logits: jax.Array,
    weights: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    r"""Softmax of the weighted mean of raw logits: :math:`\mathrm{softmax}(\sum_k w_k z_k / T)`.

    Offered for comparison with tools that fuse this way (e.g. TextBrewer); it is not the
    mean of the teachers' probabilities, and it lets a teacher with large-magnitude logits
    dominate.

    Args:
      teacher_logits: `[K, ..., C]`.
      weights: optional `[K]` or `[K, ...]`, uniform when None.
      temperature: T > 0.

    Returns:
      `[..., C]` target distribution.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.objective.targets import fuse_logits
      >>> fuse_logits(jnp.array([[2.0, 0.0], [-2.0, 0.0]]))
      Array([0.5, 0.5], dtype=float32)
    """
    teacher_logits = jnp.asarray(teacher_logits)
    k = _checks.check_teachers(teacher_logits, "teacher_logits")
    if weights is None:
        weights = jnp.full((k,), 1.0 / k, dtype=teacher_logits.dtype)
    weights = jnp.asarray(weights)
    _checks.check_weights(weights, "weights", teacher_logits.shape, "teacher_logits")
    w = expand_to(jnp.asarray(weights, teacher_logits.dtype), teacher_logits.ndim)
    mean = jnp.sum(w * teacher_logits, axis=0)
    return softmax_t(mean, temperature=temperature)


class DistillTargets(NamedTuple):
    """What the teachers give the student for one batch.

    Attributes:
      targets: `[..., C]` fused target distribution (at the distillation temperature).
      weights: `[K, ...]` per-example teacher weights, summing to 1 over K.
      probs: `[K, ..., C]` teacher probabilities at the distillation temperature.
    """

    targets: jax.Array
    weights: jax.Array
    probs: jax.Array


def distill_targets(
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    label_mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    weighting: str | Callable = "uniform",
    known: jax.Array | None = None,
    available: jax.Array | None = None,
) -> DistillTargets:
    r"""Teacher logits -> fused target, per-example teacher weights, teacher probabilities.

    :math:`p_k = \mathrm{softmax}(z_k / T)`,
    :math:`w = \mathrm{weighting}(p, \text{logits}=z, \text{labels}=y, \text{label\_mask}=m)`
    and :math:`t = \sum_k w_k p_k` (a mean of **probabilities**, see `fuse_targets`). What a
    strategy does with unlabeled examples (`label_mask` 0, or no `labels`) is said in its
    docstring (`mtkd_jax.weighting`).

    Args:
      teacher_logits: `[K, ..., C]` (`[K, B, C]` for classification).
      labels: optional `[...]` int labels.
      label_mask: optional `[...]`, 1 for labeled examples.
      temperature: T > 0.
      weighting: a name in `mtkd_jax.weighting.WEIGHTINGS` (resolved here), or a weighting
        function, used as given (`mtkd_jax.weighting.get_weighting` binds hyperparameters
        and checks a function of your own against the protocol).
      known: optional `[K, C]` bool, the classes each teacher knows (teachers with
        different class sets, `mtkd_jax.core.class_sets`): logits of unknown classes (which may
        hold anything, -inf included) become `UNKNOWN_LOGIT`, so each teacher's
        distribution is renormalised over its classes, the weighting sees the masked logits
        and the target is :math:`t = \sum_k w_k \tilde p_k`. None (or a full mask): every
        teacher knows every class, today's behaviour exactly.
      available: optional `[K, ...]` (1 = teacher k can speak at this position, 0 = it
        cannot: teachers with their own tokenizers, `mtkd_jax.data.alignment`). The
        weighting sees an unavailable teacher's logits replaced by zeros (a uniform
        distribution), then the weights are restricted to the available teachers and
        renormalised (`restrict_weights`), :math:`w'_k = w_k a_k / \sum_j w_j a_j`; where
        every teacher is available the weights are used exactly as computed, and where none
        is (or the available ones have weight 0) every weight is 0 and the target is all
        zeros (soft KL 0). For strategies that are a softmax over per-teacher scores
        (``uniform``, ``static``, ``from_scores``, ``posterior``) this is exactly the
        strategy over the available teachers; for the others (``confidence``, ``entropy``,
        ``agreement``, the routing ones) it is their weights over all K, an unavailable
        teacher counted as uniform, renormalised.

    Returns:
      `DistillTargets(targets [..., C], weights [K, ...], probs [K, ..., C])`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.objective.targets import distill_targets
      >>> z = jnp.log(jnp.array([[[0.2, 0.3, 0.5]], [[0.1, 0.4, 0.5]]]))   # [K=2, B=1, C=3]
      >>> [round(v, 4) for v in distill_targets(z).targets[0].tolist()]
      [0.15, 0.35, 0.5]
    """
    teacher_logits = jnp.asarray(teacher_logits)
    _checks.check_teachers(teacher_logits, "teacher_logits")
    teacher_logits = at_least_float32(teacher_logits)  # weights in float32 for bf16 teachers
    if known is not None:
        teacher_logits = mask_unknown(teacher_logits, known)
    lead = teacher_logits.shape[1:-1]
    if labels is not None:
        _checks.check_labels(labels, "labels", lead)
    if label_mask is not None and tuple(jnp.shape(label_mask)) != tuple(lead):
        raise ValueError(
            f"`label_mask` must have shape {tuple(lead)} (the batch dims of `teacher_logits` "
            f"{teacher_logits.shape}), got {jnp.shape(label_mask)}."
        )
    fn = get_weighting(weighting) if isinstance(weighting, str) else weighting
    if available is not None:
        if tuple(jnp.shape(available)) != tuple(teacher_logits.shape[:-1]):
            raise ValueError(
                f"`available` must have shape [K, ...]={tuple(teacher_logits.shape[:-1])} (the "
                f"teacher logits' without the classes), got {jnp.shape(available)}."
            )
        avail = jnp.asarray(available) > 0
        teacher_logits = jnp.where(avail[..., None], teacher_logits, 0.0)
    probs = softmax_t(teacher_logits, temperature=temperature)
    w = jnp.asarray(
        fn(probs, logits=teacher_logits, labels=labels, label_mask=label_mask), probs.dtype
    )
    if w.shape == probs.shape[:1]:
        w = jnp.broadcast_to(expand_to(w, w.ndim + len(lead)), probs.shape[:-1])
    if w.shape != probs.shape[:-1]:
        raise ValueError(
            f"the weighting returned shape {w.shape}; expected [K]={probs.shape[:1]} or "
            f"[K, ...]={probs.shape[:-1]}."
        )
    if available is not None:
        w = restrict_weights(w, avail)
        # fuse_targets' sum, without its check that the weights sum to 1 (0 where no
        # teacher is available)
        return DistillTargets(jnp.sum(w[..., None] * probs, axis=0), w, probs)
    return DistillTargets(fuse_targets(probs, w), w, probs)


def restrict_weights(weights: jax.Array, available: jax.Array) -> jax.Array:
    r"""Teacher weights `[K, ...]` restricted to the available teachers (bool `[K, ...]`):
    :math:`w_k a_k / \sum_j w_j a_j`; unchanged (bit for bit) where all are available; all
    zeros where the available ones have no weight.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[0.5, 0.5], [0.25, 0.5], [0.25, 0.0]])
      >>> a = jnp.array([[1, 1], [1, 0], [0, 0]]) > 0
      >>> [[round(v, 4) for v in r] for r in restrict_weights(w, a).tolist()]
      [[0.6667, 1.0], [0.3333, 0.0], [0.0, 0.0]]
    """
    wa = jnp.where(available, weights, 0.0)
    total = jnp.sum(wa, axis=0)
    share = jnp.where(total > 0, wa / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.where(jnp.all(available, axis=0), weights, share)
