"""Dataset-level classification metrics from additive sufficient statistics.

A metric such as macro F1 or ECE is not a mean of per-batch values, so evaluation keeps
counts and sums (`MetricStats`) that add exactly across batches and devices (`merge_stats`,
or `jax.lax.psum` inside a mapped function), and turns them into metrics once at the end
(`compute_metrics`). Every function here is pure and jit-safe.

Shapes: B examples, C classes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks

__all__ = [
    "NUM_BINS",
    "MetricStats",
    "init_stats",
    "batch_stats",
    "update_stats",
    "merge_stats",
    "compute_metrics",
]

NUM_BINS = 15
"""Equal-width confidence bins for the expected calibration error (Guo et al., 2017)."""


class MetricStats(NamedTuple):
    """Additive statistics of a classifier over a set of examples.

    Attributes:
      confusion: `[C, C]` int32, `confusion[y, p]` counts examples of true class y predicted p.
      nll_sum: `[]` float32, summed negative log-likelihood of the true labels.
      bin_count: `[NUM_BINS]` int32, examples whose confidence (max probability) falls in each
        bin `((b-1)/15, b/15]`.
      bin_confidence: `[NUM_BINS]` float32, summed confidence per bin.
      bin_correct: `[NUM_BINS]` int32, correct predictions per bin.
      agree: `[]` int32, examples whose argmax matches the reference distribution's argmax.
      agree_n: `[]` int32, examples compared with a reference (0 when none was given).
      n: `[]` int32, examples counted.
    """

    confusion: jax.Array
    nll_sum: jax.Array
    bin_count: jax.Array
    bin_confidence: jax.Array
    bin_correct: jax.Array
    agree: jax.Array
    agree_n: jax.Array
    n: jax.Array


def init_stats(num_classes: int) -> MetricStats:
    """Empty statistics for `num_classes` classes.

    Example:
      >>> from mtkd_jax.metrics import init_stats
      >>> init_stats(3).confusion.shape
      (3, 3)
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}.")
    i0 = jnp.zeros((), jnp.int32)
    return MetricStats(
        confusion=jnp.zeros((num_classes, num_classes), jnp.int32),
        nll_sum=jnp.zeros((), jnp.float32),
        bin_count=jnp.zeros((NUM_BINS,), jnp.int32),
        bin_confidence=jnp.zeros((NUM_BINS,), jnp.float32),
        bin_correct=jnp.zeros((NUM_BINS,), jnp.int32),
        agree=i0,
        agree_n=i0,
        n=i0,
    )


def batch_stats(
    logits: jax.Array,
    labels: jax.Array,
    *,
    reference_probs: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> MetricStats:
    """Statistics of one batch.

    Args:
      logits: `[B, C]` predicted logits (log-probabilities also work: only their softmax is
        used).
      labels: `[B]` integer labels in `[0, C)`; entries where `mask` is 0 are ignored and may
        hold anything (e.g. -1 padding).
      reference_probs: optional `[B, C]` distribution to measure agreement with (e.g. the
        teacher ensemble's probabilities).
      mask: optional `[B]`, 1 for examples to count and 0 for padding.

    Returns:
      `MetricStats` of the batch.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.metrics import batch_stats
      >>> s = batch_stats(jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.array([0, 0]))
      >>> s.confusion.tolist(), int(s.n)
      ([[1, 1], [0, 0]], 2)
    """
    _checks.check_float(logits, "logits")
    if jnp.ndim(logits) != 2:
        raise ValueError(f"`logits` must have shape [B, C], got {jnp.shape(logits)}.")
    b, c = logits.shape
    _checks.check_labels(labels, "labels", (b,))
    if mask is None:
        valid = jnp.ones((b,), bool)
    else:
        if jnp.shape(mask) != (b,):
            raise ValueError(f"`mask` must have shape [B]=({b},), got {jnp.shape(mask)}.")
        valid = jnp.asarray(mask) > 0
    # Masked rows may carry placeholder labels; a valid index keeps gathers finite.
    y = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    pred = jnp.argmax(logp, axis=-1)
    conf = jnp.exp(jnp.max(logp, axis=-1))
    correct = (pred == y) & valid
    vi = valid.astype(jnp.int32)

    confusion = jnp.zeros((c, c), jnp.int32).at[y, pred].add(vi)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    nll_sum = jnp.sum(jnp.where(valid, nll, 0.0))
    # Bin b holds confidences in ((b-1)/M, b/M]; confidence >= 1/C > 0, so ceil(.) >= 1.
    bins = jnp.clip(jnp.ceil(conf * NUM_BINS).astype(jnp.int32) - 1, 0, NUM_BINS - 1)
    bin_count = jnp.zeros((NUM_BINS,), jnp.int32).at[bins].add(vi)
    bin_conf = jnp.zeros((NUM_BINS,), jnp.float32).at[bins].add(jnp.where(valid, conf, 0.0))
    bin_correct = jnp.zeros((NUM_BINS,), jnp.int32).at[bins].add(correct.astype(jnp.int32))

    if reference_probs is None:
        agree = agree_n = jnp.zeros((), jnp.int32)
    else:
        _checks.check_float(reference_probs, "reference_probs")
        if jnp.shape(reference_probs) != (b, c):
            raise ValueError(
                f"`reference_probs` must have the shape of `logits` [B, C]=({b}, {c}), "
                f"got {jnp.shape(reference_probs)}."
            )
        same = (pred == jnp.argmax(reference_probs, axis=-1)) & valid
        agree = jnp.sum(same.astype(jnp.int32))
        agree_n = jnp.sum(vi)
    return MetricStats(
        confusion=confusion,
        nll_sum=nll_sum,
        bin_count=bin_count,
        bin_confidence=bin_conf,
        bin_correct=bin_correct,
        agree=agree,
        agree_n=agree_n,
        n=jnp.sum(vi),
    )


def merge_stats(a: MetricStats, b: MetricStats) -> MetricStats:
    """Sum two sets of statistics (of disjoint example sets).

    Example:
      >>> from mtkd_jax.metrics import init_stats, merge_stats
      >>> int(merge_stats(init_stats(2), init_stats(2)).n)
      0
    """
    return jax.tree.map(jnp.add, a, b)


def update_stats(
    stats: MetricStats,
    logits: jax.Array,
    labels: jax.Array,
    *,
    reference_probs: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> MetricStats:
    """Add a batch `logits [B, C]`, `labels [B]` to `stats`; arguments as in `batch_stats`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.metrics import init_stats, update_stats, compute_metrics
      >>> s = init_stats(2)
      >>> s = update_stats(s, jnp.array([[2.0, 0.0]]), jnp.array([0]))
      >>> s = update_stats(s, jnp.array([[2.0, 0.0]]), jnp.array([1]))
      >>> float(compute_metrics(s)["accuracy"])
      0.5
    """
    if stats.confusion.shape[-1] != jnp.shape(logits)[-1]:
        raise ValueError(
            f"`stats` are for {stats.confusion.shape[-1]} classes but `logits` have "
            f"{jnp.shape(logits)[-1]} (shape {jnp.shape(logits)})."
        )
    return merge_stats(
        stats, batch_stats(logits, labels, reference_probs=reference_probs, mask=mask)
    )


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0 (sklearn's zero_division=0)."""
    den = jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def compute_metrics(stats: MetricStats) -> dict[str, jax.Array]:
    r"""Metrics from accumulated statistics.

    * ``accuracy``: correct / n.
    * ``precision``, ``recall``, ``f1``: macro averages as `sklearn.metrics.precision_score`
      (and recall, F1) with ``average="macro", zero_division=0`` and default ``labels``:
      per class :math:`P_c = TP/(TP+FP)`, :math:`R_c = TP/(TP+FN)`,
      :math:`F1_c = 2TP/(2TP+FP+FN)`, a zero denominator giving 0, averaged over the classes
      that occur among the true labels or the predictions (a class absent from both is left
      out of the mean, as sklearn does).
    * ``nll``: mean negative log-likelihood of the true labels.
    * ``ece``: expected calibration error over 15 equal-width confidence bins,
      :math:`\sum_b |\mathrm{correct}_b - \mathrm{conf}_b| / n`.
    * ``agreement``: fraction of examples whose argmax matches the reference's; NaN when no
      reference was given.
    * ``n``: number of examples.

    With n = 0 every metric is 0 except agreement (NaN).

    Args:
      stats: `MetricStats` (e.g. from `update_stats`).

    Returns:
      dict of scalar arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.metrics import batch_stats, compute_metrics
      >>> s = batch_stats(jnp.array([[2.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1]))
      >>> m = compute_metrics(s)
      >>> [round(float(m[k]), 4) for k in ("accuracy", "precision", "recall", "f1")]
      [0.5, 0.25, 0.5, 0.3333]
    """
    cm = stats.confusion.astype(jnp.float32)
    tp = jnp.diag(cm)
    support = jnp.sum(cm, axis=1)
    predicted = jnp.sum(cm, axis=0)
    present = (support + predicted) > 0
    n_present = jnp.sum(present)

    def macro(per_class):
        return _safe_div(jnp.sum(jnp.where(present, per_class, 0.0)), n_present)

    n = stats.n
    agreement = jnp.where(
        stats.agree_n > 0,
        stats.agree / jnp.maximum(stats.agree_n, 1).astype(jnp.float32),
        jnp.nan,
    )
    gap = jnp.abs(stats.bin_correct.astype(jnp.float32) - stats.bin_confidence)
    return {
        "accuracy": _safe_div(jnp.sum(tp), n),
        "precision": macro(_safe_div(tp, predicted)),
        "recall": macro(_safe_div(tp, support)),
        "f1": macro(_safe_div(2.0 * tp, support + predicted)),
        "nll": _safe_div(stats.nll_sum, n),
        "ece": _safe_div(jnp.sum(gap), n),
        "agreement": agreement,
        "n": n,
    }
