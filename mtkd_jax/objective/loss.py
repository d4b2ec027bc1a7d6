r"""The batch objective of a step, whole or in chunks of the sequence.

`mean_distillation_loss` is the distillation loss of a batch given its targets: the soft term
averaged over every counted position, CE over the labeled ones (`distillation_sums` then
`finish_loss`); `mean_cross_entropy` the supervised loss. `distill_sums` is the whole way
from student logits and teacher logits to what a distillation step needs, as sums over the
counted positions (examples, or the valid tokens of a sequence batch): targets
(`targets.distill_targets`: softmax at T, per-position teacher weights, fused target), the
two loss terms (`distillation_sums`) and the metric sums (teacher weights, teacher
divergence, agreement, accuracy). Sums add exactly across chunks and
devices; `finish_distill` divides them by the global counts.

`chunked_distill_sums` gives the same sums for a sequence batch without ever holding the
`[B, L, V]` student logits or the `[K, B, L, V]` teacher probabilities: the model exposes
features `[B, L, H]` and an output head (features -> logits), and the head, the targets and
the loss run on `chunk_size` positions at a time inside a `jax.lax.scan` whose body is
`jax.checkpoint`-ed, so the backward pass recomputes each chunk's logits instead of keeping
them. Peak memory then grows with `B * chunk_size * V * K`, not with `L`; the gradients are
those of the unchunked loss. `chunked_distill_objective` / `chunked_distill_loss` (what the
distillation step runs) take each chunk's backward pass right after its forward pass and add
up the gradients instead, since the loss is linear in the sums with factors known from the
masks: nothing is recomputed, and the chunked step is no slower than the unchunked one
(benchmarks/lm.py). Teachers run online are chunked alike (their features
`[K, B, L, H_t]` and their head); precomputed teacher logits `[K, B, L, V]` are an input
and are sliced, not copied.

The per-position weightings of `mtkd_jax.weighting` see one position at a time, so chunking
changes nothing in them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.argmax import is_argmax
from mtkd_jax.core.class_sets import pairwise_divergence_known
from mtkd_jax.core.divergence import pairwise_divergence
from mtkd_jax.core.losses import cross_entropy, mix_losses, safe_labels, soft_kl, soft_loss_fn
from mtkd_jax.core.reduce import (
    combine_masks,
    expand_to,
    global_count,
    global_mean,
    masked_sum,
    normalize,
)
from mtkd_jax.core.vocab_projection import uld_from_top
from mtkd_jax.objective.targets import distill_targets
from mtkd_jax.objective.top_k_slots import check_top_k_inputs, top_k_slots
from mtkd_jax.weighting import uniform

__all__ = [
    "LossParts",
    "LossSums",
    "distillation_sums",
    "finish_loss",
    "mean_distillation_loss",
    "mean_cross_entropy",
    "DEFAULT_CHUNK_SIZE",
    "DistillSums",
    "distill_sums",
    "chunked_distill_sums",
    "chunked_distill_objective",
    "chunked_distill_loss",
    "finish_distill",
]

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
    soft_weight: jax.Array | None = None,
    soft_extra: jax.Array | None = None,
) -> LossSums:
    r"""The two terms of the distillation loss as sums over this device's positions.

    Sums (not means) add exactly across the chunks of a sequence (`chunked_distill_sums`)
    and across devices; `finish_loss` divides them by the global counts.

    Args:
      student_logits: `[B, C]` or `[B, L, V]`.
      targets: same shape, target probabilities (held fixed).
      labels: optional `[B]` / `[B, L]` int labels.
      temperature: T > 0.
      soft_loss: a name in `SOFT_LOSSES` or a soft loss function (`soft_loss_fn`).
      label_mask: optional `[B]` (or `[B, L]`), 1 for labeled positions.
      mask: optional `[B, L]` padding mask (0 = padding: in neither term).
      soft_weight: optional `[B]` / `[B, L]` factor on each position's soft loss, the count
        unchanged (0 where no teacher can speak: soft loss 0, still counted).
      soft_extra: optional `[B]` / `[B, L]` term added to each position's soft loss (the
        ULD term of teachers with their own tokenizers).

    Returns:
      `LossSums`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.objective.loss import distillation_sums
      >>> s = distillation_sums(jnp.zeros((1, 2, 2)), jnp.full((1, 2, 2), 0.5),
      ...                       jnp.array([[0, 1]]), mask=jnp.array([[1, 0]]))
      >>> float(s.soft), round(float(s.hard), 4), float(s.soft_count)
      (0.0, 0.6931, 1.0)
    """
    targets = jax.lax.stop_gradient(targets)
    soft_vals = soft_loss_fn(soft_loss)(student_logits, targets, temperature=temperature)
    if mask is None and soft_vals.ndim > 1:
        mask = jnp.ones(soft_vals.shape, soft_vals.dtype)  # every token counts
    soft_w = None if mask is None else jnp.asarray(mask, soft_vals.dtype)
    if soft_extra is not None:
        soft_vals = soft_vals + soft_extra
    if soft_weight is not None:
        soft_vals = jnp.where(jnp.asarray(soft_weight) > 0, soft_vals, 0.0)
    soft = masked_sum(soft_vals, soft_w)
    soft_count = (jnp.asarray(soft_vals.shape[0], soft_vals.dtype) if soft_w is None
                  else global_count(soft_w))
    if labels is None:
        zero = jnp.zeros((), soft.dtype)
        return LossSums(soft, zero, soft_count, zero)
    hard_mask = combine_masks(mask, label_mask)
    ce = cross_entropy(student_logits, safe_labels(labels, hard_mask))
    hard_w = None if hard_mask is None else jnp.asarray(hard_mask, ce.dtype)
    hard = masked_sum(ce, hard_w)
    hard_count = (jnp.asarray(ce.shape[0], ce.dtype) if hard_w is None
                  else global_count(hard_w))
    return LossSums(soft, hard, soft_count, hard_count)


def finish_loss(
    sums: LossSums, *, alpha: float | jax.Array = 0.0, axis_name: str | None = None
) -> LossParts:
    r"""Divide `LossSums` by the global counts (psum'ed over `axis_name`) and mix them
    (`alpha` is checked by `mix_losses`).

    With `axis_name` the counts are summed over the devices and every device returns
    `reduce.normalize`'s scaled share, so the pmean of the loss and of its gradients is the
    single-device value.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.objective.loss import LossSums, finish_loss
      >>> sums = LossSums(*map(jnp.float32, (2.0, 3.0, 4.0, 1.0)))
      >>> [float(v) for v in finish_loss(sums, alpha=0.5)]
      [1.75, 0.5, 3.0]
    """
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
      >>> from mtkd_jax.objective.loss import mean_distillation_loss
      >>> s = jnp.zeros((2, 2)); t = jnp.full((2, 2), 0.5); y = jnp.array([0, 1])
      >>> parts = mean_distillation_loss(s, t, y, alpha=0.5, label_mask=jnp.array([1, 0]))
      >>> [round(float(v), 4) for v in parts]
      [0.3466, 0.0, 0.6931]
    """
    soft_fn = soft_loss_fn(soft_loss)
    _checks.check_unit_interval(alpha, "alpha")
    _checks.check_labels_for_alpha(labels, alpha)
    sums = distillation_sums(student_logits, targets, labels, temperature=temperature,
                             soft_loss=soft_fn, label_mask=label_mask, mask=mask)
    return finish_loss(sums, alpha=alpha, axis_name=axis_name)


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
      >>> from mtkd_jax.objective.loss import mean_cross_entropy
      >>> z = jnp.array([[0.0, 0.0], [9.0, -9.0]])
      >>> mean_cross_entropy(z, jnp.array([0, -1]), label_mask=jnp.array([1, 0])).round(4)
      Array(0.6931, dtype=float32)
    """
    hard_mask = combine_masks(mask, label_mask)
    ce = cross_entropy(logits, safe_labels(labels, hard_mask))
    return global_mean(ce, hard_mask, axis_name=axis_name)


DEFAULT_CHUNK_SIZE = 128
"""Sequence positions per chunk. At K = 4, B = 8, L = 2048, V = 32k (float32) the compiled
chunked step's temporary memory is ~0.19x the unchunked step's (`benchmarks/memory.py`);
it grows linearly with the chunk."""


class DistillSums(NamedTuple):
    """Sums over this device's counted positions (see `finish_distill` for the means).

    Attributes:
      loss: `LossSums` (soft and hard terms and their counts).
      weights: `[K]` summed per-position teacher weights.
      divergence: `[K, K]` summed pairwise teacher divergence (zeros `[1, 1]` for K = 1).
      agree: `[]` positions where the student argmax equals the fused target's.
      correct: `[]` labeled positions the student predicts right (0 without labels).
      finite: `[]` 1.0 when every counted teacher logit is finite.
      available: `[K]` counted positions where each teacher can speak (None without an
        availability mask).
      unaligned: `[]` counted positions where no teacher can (None without one).
    """

    loss: LossSums
    weights: jax.Array
    divergence: jax.Array
    agree: jax.Array
    correct: jax.Array
    finite: jax.Array
    available: jax.Array | None = None
    unaligned: jax.Array | None = None


def _check_top_k_use(temperature, known, available, unmatched) -> None:
    """What the top-k slot path does not combine with (ValueError naming it)."""
    if not _checks.is_traced(temperature) and float(temperature) != 1.0:
        raise ValueError(
            f"teacher top-k entries (the slot space) are distilled at T = 1 only, got "
            f"temperature={temperature}: tempering the rest bucket is not tempering its "
            "classes. Expand the entries (`mtkd_jax.cache.expand_top_k`) to use a temperature."
        )
    for name, value in (("known", known), ("available", available),
                        ("unmatched", unmatched)):
        if value is not None:
            raise ValueError(f"`{name}` does not combine with teacher top-k entries; expand "
                             "them (`mtkd_jax.cache.expand_top_k`) first.")


def distill_sums(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    label_mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    weighting: str | Callable = uniform,
    soft_loss: str | Callable = soft_kl,
    divergence_kind: str = "squared",
    known=None,
    available: jax.Array | None = None,
    unmatched: jax.Array | None = None,
    student_unmatched: jax.Array | None = None,
    uld_weight: float | jax.Array = 1.0,
) -> DistillSums:
    r"""Targets, loss terms and metric sums of one block of positions.

    Args:
      student_logits: `[B, C]` or `[B, L, V]`.
      teacher_logits: `[K, B, C]` or `[K, B, L, V]`, frozen; or the teachers' top-k entries,
        a 3-tuple `(log_probs [K, ..., k], classes [K, ..., k], log_rest [K, ...])` (e.g.
        `mtkd_jax.cache.TopK`), which are never expanded: targets, loss and metrics are taken
        in their slot space (`mtkd_jax.objective.top_k_slots`: the stored classes, the
        label and one bucket for the rest), T = 1 only, without `known`, `available` or
        `unmatched`.
      labels: optional `[B]` / `[B, L]` int labels.
      mask: optional `[B, L]` padding mask (0 = padding: in no loss, weight or metric).
      label_mask: optional `[B]` or `[B, L]`, 1 for labeled positions.
      temperature, divergence_kind, known: as in `make_distill_step` (`known` `[K, C]`:
        teachers with different class sets).
      weighting: a weighting name or function; a name is resolved by `distill_targets`, a
        function used as given (the steps resolve it once, `get_weighting`, and pass it).
      soft_loss: a name in `SOFT_LOSSES` or the function (`soft_loss_fn`), likewise.
      available: optional `[K, B]` / `[K, B, L]`, 1 where teacher k can speak
        (`distill_targets(available=)`: teachers with their own tokenizers); a position
        where none can has soft loss 0 and is counted (`DistillSums.unaligned`).
      unmatched: optional `[K, B, L, M + 1]`, each teacher's top unmatched probabilities
        (`mtkd_jax.core.vocab_projection.unmatched_top`, method ``"uld"``): adds
        :math:`\lambda \sum_k w_k\, \mathrm{ULD}_k` to each position's soft loss
        (`uld_from_top`, T = 1), with the position's teacher weights w and
        :math:`\lambda` = `uld_weight`.
      student_unmatched: bool `[K, V]`, the student tokens teacher k matches no token to
        (needed with `unmatched`).
      uld_weight: :math:`\lambda`.

    Returns:
      `DistillSums`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.objective.loss import distill_sums, finish_distill
      >>> s, z = jnp.zeros((1, 3, 4)), jnp.zeros((2, 1, 3, 4))
      >>> parts, metrics = finish_distill(distill_sums(s, z, mask=jnp.array([[1, 1, 0]])))
      >>> float(parts.loss), metrics["teacher_weights"].tolist()
      (0.0, [0.5, 0.5])
    """
    if isinstance(teacher_logits, tuple):  # top-k entries: the slot space
        _check_top_k_use(temperature, known, available, unmatched)
        top = check_top_k_inputs(teacher_logits, jnp.shape(student_logits)[:-1])
        student_logits, teacher_logits, labels = top_k_slots(
            student_logits, *jax.lax.stop_gradient(top), labels)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if mask is None and jnp.ndim(student_logits) > 2:
        mask = jnp.ones(jnp.shape(student_logits)[:-1], jnp.float32)  # every token counts
    hard_mask = combine_masks(mask, label_mask)
    dt = distill_targets(teacher_logits, labels, label_mask=hard_mask, temperature=temperature,
                         weighting=weighting, known=known, available=available)
    targets = jax.lax.stop_gradient(dt.targets)
    if student_logits.shape[-1] != targets.shape[-1]:
        raise ValueError(
            f"the student predicts {student_logits.shape[-1]} classes but the teachers "
            f"{targets.shape[-1]} (teacher logits {teacher_logits.shape}); they must share the "
            "class count."
        )
    speaks = None if available is None else jnp.any(jnp.asarray(available) > 0, axis=0)
    extra = None
    if unmatched is not None:
        if student_unmatched is None:
            raise ValueError("`unmatched` (the ULD term) needs `student_unmatched` [K, V].")
        per = jax.vmap(uld_from_top, in_axes=(None, 0, 0))(
            student_logits, jax.lax.stop_gradient(unmatched), jnp.asarray(student_unmatched))
        extra = uld_weight * jnp.sum(jax.lax.stop_gradient(dt.weights) * per, axis=0)
    loss = distillation_sums(student_logits, targets, labels, temperature=temperature,
                             soft_loss=soft_loss, label_mask=label_mask, mask=mask,
                             soft_weight=speaks, soft_extra=extra)
    k = dt.probs.shape[0]
    if k > 1 and known is not None:
        div = masked_sum(pairwise_divergence_known(dt.probs, known, kind=divergence_kind), mask)
    elif k > 1:
        div = masked_sum(pairwise_divergence(dt.probs, kind=divergence_kind), mask)
    else:
        div = jnp.zeros((1, 1), dt.probs.dtype)
    pred = jnp.argmax(student_logits, -1)
    z_known = teacher_logits
    if known is not None:  # unknown classes may hold -inf by design
        c = teacher_logits.shape[-1]
        shape = (k,) + (1,) * (teacher_logits.ndim - 2) + (c,)
        z_known = jnp.where(jnp.asarray(known, bool).reshape(shape), teacher_logits, 0.0)
    # Per position `[K, ...]`, by a float reduction (max |z| is inf or NaN exactly when some
    # entry is): it fuses into one pass, where an elementwise `isfinite` would hold a
    # `[K, ..., C]` boolean (a quarter of a chunk's float32 teacher logits).
    finite = jnp.isfinite(jnp.max(jnp.abs(z_known), axis=-1))
    if mask is not None:
        finite = finite | (expand_to(jnp.asarray(mask), finite.ndim - 1)[None] <= 0)
    if labels is None:
        correct = jnp.zeros((), loss.soft.dtype)
    else:
        correct = masked_sum(is_argmax(student_logits, labels), hard_mask)
    return DistillSums(
        loss=loss,
        weights=masked_sum(jnp.moveaxis(dt.weights, 0, -1), mask),
        divergence=div,
        agree=masked_sum(is_argmax(targets, pred), mask),
        correct=correct,
        finite=jnp.all(finite).astype(jnp.float32),
        available=None if available is None else masked_sum(
            jnp.moveaxis((jnp.asarray(available) > 0).astype(jnp.float32), 0, -1), mask),
        unaligned=None if available is None else masked_sum(~speaks, mask),
    )


def finish_distill(
    sums: DistillSums, *, alpha: float | jax.Array = 0.0, axis_name: str | None = None
) -> tuple[LossParts, dict[str, jax.Array]]:
    """`DistillSums` -> (`LossParts`, metrics), means over the global batch's counted positions.

    Metrics: ``teacher_weights`` `[K]`, ``teacher_divergence`` `[K, K]`, ``agreement``,
    ``accuracy`` (with labels: `sums.loss.hard_count` > 0 or labels given), and
    ``teacher_logits_finite``, and with an availability mask ``teacher_available`` `[K]`
    (the fraction of counted positions each teacher speaks at) and ``unaligned`` (the
    fraction where none does); with `axis_name` each is this device's share, to be pmean'd.
    """
    parts = finish_loss(sums.loss, alpha=alpha, axis_name=axis_name)
    n, n_hard = sums.loss.soft_count, sums.loss.hard_count
    if axis_name is not None:
        n, n_hard = jax.lax.psum(n, axis_name), jax.lax.psum(n_hard, axis_name)
    n, n_hard = jax.lax.stop_gradient(n), jax.lax.stop_gradient(n_hard)
    metrics = {
        "teacher_weights": normalize(sums.weights, n, axis_name=axis_name),
        "teacher_divergence": normalize(sums.divergence, n, axis_name=axis_name),
        "agreement": normalize(sums.agree, n, axis_name=axis_name),
        "accuracy": normalize(sums.correct, n_hard, axis_name=axis_name),
        "teacher_logits_finite": sums.finite,
    }
    if sums.available is not None:  # teachers with their own tokenizers
        metrics["teacher_available"] = normalize(sums.available, n, axis_name=axis_name)
        metrics["unaligned"] = normalize(sums.unaligned, n, axis_name=axis_name)
    return parts, metrics


def _chunk(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def chunked_distill_sums(
    features: jax.Array,
    student_head: Callable,
    head_params,
    teacher_inputs: jax.Array,
    teacher_head: Callable | None = None,
    teacher_params=None,
    labels: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    label_mask: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float | jax.Array = 1.0,
    weighting: str | Callable = uniform,
    soft_loss: str | Callable = soft_kl,
    divergence_kind: str = "squared",
    known=None,
    available: jax.Array | None = None,
    unmatched: jax.Array | None = None,
    student_unmatched: jax.Array | None = None,
    uld_weight: float | jax.Array = 1.0,
) -> DistillSums:
    r"""`distill_sums` of a sequence batch, computed `chunk_size` positions at a time.

    Equal to `distill_sums(student_head(head_params, features), logits_t, ...)` with
    `logits_t = teacher_head(teacher_params, teacher_inputs)` (or `teacher_inputs` itself when
    `teacher_head` is None), in value and in gradient (to float rounding), with peak memory
    set by the chunk. The last chunk, when `chunk_size` does not divide L, overlaps the one
    before it and counts only its new positions.

    Args:
      features: `[B, L, H]` the student's features (differentiable).
      student_head: `student_head(head_params, features [B, c, H]) -> [B, c, V]`.
      head_params: what `student_head` takes (e.g. the whole student params).
      teacher_inputs: `[K, B, L, V]` precomputed teacher logits, or `[K, B, L, H_t]` teacher
        features when `teacher_head` is given, or the teachers' top-k entries
        `(log_probs [K, B, L, k], classes [K, B, L, k], log_rest [K, B, L])` (`distill_sums`:
        the slot space, never expanded to V).
      teacher_head: optional `teacher_head(teacher_params, [K, B, c, H_t]) -> [K, B, c, V]`.
      teacher_params: what `teacher_head` takes.
      labels: optional `[B, L]`.
      mask: optional `[B, L]` padding mask.
      label_mask: optional `[B]` or `[B, L]`.
      chunk_size: positions per chunk (static), >= 1; clipped to L.
      temperature, weighting, soft_loss, divergence_kind, known, available, unmatched,
        student_unmatched, uld_weight: as in `distill_sums` (`available` `[K, B, L]` and
        `unmatched` `[K, B, L, M + 1]` sliced with the chunks).

    Returns:
      `DistillSums` (sums over all chunks).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.objective.loss import chunked_distill_sums, distill_sums
      >>> f = jax.random.normal(jax.random.key(0), (2, 5, 3))
      >>> w = jax.random.normal(jax.random.key(1), (3, 7))
      >>> zt = jax.random.normal(jax.random.key(2), (2, 2, 5, 7))
      >>> head = lambda w, f: f @ w
      >>> a = chunked_distill_sums(f, head, w, zt, chunk_size=2).loss.soft
      >>> b = distill_sums(head(w, f), zt).loss.soft
      >>> bool(jnp.allclose(a, b, rtol=1e-5))
      True
    """
    one, args, num, _ = _chunk_plan(
        features, student_head, head_params, teacher_inputs, teacher_head, teacher_params,
        labels, mask=mask, label_mask=label_mask, chunk_size=chunk_size,
        temperature=temperature, weighting=weighting, soft_loss=soft_loss,
        divergence_kind=divergence_kind, known=known, available=available, unmatched=unmatched,
        student_unmatched=student_unmatched, uld_weight=uld_weight)
    one = jax.checkpoint(one)
    first = one(*args, 0)
    if num == 1:
        return first

    def add(total, i):
        return _add_sums(total, one(*args, i)), None

    total, _ = jax.lax.scan(add, first, jnp.arange(1, num))
    return total


def chunked_distill_objective(
    features: jax.Array,
    student_head: Callable,
    head_params,
    teacher_inputs: jax.Array,
    teacher_head: Callable | None = None,
    teacher_params=None,
    labels: jax.Array | None = None,
    *,
    soft_scale: float | jax.Array,
    hard_scale: float | jax.Array,
    mask: jax.Array | None = None,
    label_mask: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float | jax.Array = 1.0,
    weighting: str | Callable = uniform,
    soft_loss: str | Callable = soft_kl,
    divergence_kind: str = "squared",
    known=None,
    available: jax.Array | None = None,
    unmatched: jax.Array | None = None,
    student_unmatched: jax.Array | None = None,
    uld_weight: float | jax.Array = 1.0,
) -> tuple[jax.Array, DistillSums]:
    r"""`chunked_distill_sums` with the gradient taken in the forward pass, chunk by chunk.

    Returns :math:`J = s \cdot \Sigma_{soft} + h \cdot \Sigma_{hard}` (`soft_scale` s and
    `hard_scale` h, e.g. the loss's factors on the two sums: `finish_loss` is linear in them)
    and the sums. Each chunk's forward pass and its backward pass run once, back to back, and
    its gradients of J with respect to `head_params` and `features` are added up in the scan:
    nothing is recomputed (the `jax.checkpoint` of `chunked_distill_sums` runs the head, the
    teachers' softmaxes and the targets of every chunk twice). Memory is the same: one chunk's
    temporaries, plus gradient accumulators the size of `head_params` and `features`.

    Only J is differentiable (with respect to `head_params` and `features`; the teacher side
    is held fixed as in `chunked_distill_sums`); the returned sums carry no gradient. Same
    arguments as `chunked_distill_sums`, plus:

    Args:
      soft_scale: `[]` the factor s on the summed soft loss (held fixed).
      hard_scale: `[]` the factor h on the summed CE (held fixed).

    Returns:
      `(J [], DistillSums)`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.objective.loss import chunked_distill_objective, chunked_distill_sums
      >>> f = jax.random.normal(jax.random.key(0), (2, 5, 3))
      >>> w = jax.random.normal(jax.random.key(1), (3, 7))
      >>> zt = jax.random.normal(jax.random.key(2), (2, 2, 5, 7))
      >>> head = lambda w, f: f @ w
      >>> g = jax.grad(lambda w: chunked_distill_objective(
      ...     f, head, w, zt, chunk_size=2, soft_scale=0.1, hard_scale=0.0)[0])(w)
      >>> ref = jax.grad(lambda w: 0.1 * chunked_distill_sums(
      ...     f, head, w, zt, chunk_size=2).loss.soft)(w)
      >>> bool(jnp.allclose(g, ref, rtol=1e-5, atol=1e-7))
      True
    """
    one, args, num, (start_of, size) = _chunk_plan(
        features, student_head, head_params, teacher_inputs, teacher_head, teacher_params,
        labels, mask=mask, label_mask=label_mask, chunk_size=chunk_size,
        temperature=temperature, weighting=weighting, soft_loss=soft_loss,
        divergence_kind=divergence_kind, known=known, available=available, unmatched=unmatched,
        student_unmatched=student_unmatched, uld_weight=uld_weight)
    scales = jax.lax.stop_gradient((jnp.asarray(soft_scale, jnp.float32),
                                    jnp.asarray(hard_scale, jnp.float32)))
    rest = args[2:]
    leaves, treedef = jax.tree.flatten(head_params)
    # Gradients are accumulated only for the leaves the head reads (`head_params` is often
    # the whole model): the others get zeros once, not an addition per chunk.
    used = _leaves_read(student_head, leaves, treedef, features[:, :1])

    def chunk(leaves, features, i):
        """(J of chunk i, its sums, dJ/d(read leaves), dJ/d(its features)): one forward pass,
        one backward pass; the features' gradient only over the chunk's positions."""
        def objective(read, features_chunk):
            it = iter(read)
            tree = jax.tree.unflatten(treedef, [next(it) if u else x
                                                for x, u in zip(leaves, used, strict=True)])
            sums = one(tree, features, *rest, i, features_chunk=features_chunk)
            return scales[0] * sums.loss.soft + scales[1] * sums.loss.hard, sums

        read = [x for x, u in zip(leaves, used, strict=True) if u]
        features_chunk = _chunk(features, start_of(i), size, 1)
        value, vjp, sums = jax.vjp(objective, read, features_chunk, has_aux=True)
        d_read, d_chunk = vjp(jnp.ones_like(value))
        return value, sums, d_read, d_chunk

    def add_chunk(d_features, d_chunk, i):  # the overlapping last chunk's old positions get 0
        start = start_of(i)
        return jax.lax.dynamic_update_slice_in_dim(
            d_features, _chunk(d_features, start, size, 1) + d_chunk, start, axis=1)

    def forward(leaves, features):
        value, sums, d_read, d_chunk = chunk(leaves, features, 0)
        d_features = add_chunk(jnp.zeros(features.shape, d_chunk.dtype), d_chunk, 0)
        first = (value, sums, (d_read, d_features))
        if num == 1:
            return first

        def add(total, i):
            value, sums, d_read, d_chunk = chunk(leaves, features, i)
            return (total[0] + value, _add_sums(total[1], sums),
                    (jax.tree.map(jnp.add, total[2][0], d_read),
                     add_chunk(total[2][1], d_chunk, i))), None

        total, _ = jax.lax.scan(add, first, jnp.arange(1, num))
        return total

    @jax.custom_vjp
    def run(leaves, features):
        value, sums, _ = forward(leaves, features)
        return value, sums

    def run_fwd(leaves, features):
        value, sums, grads = forward(leaves, features)
        return (value, sums), grads

    def run_bwd(grads, cotangents):
        g = cotangents[0]  # the sums' cotangents are dropped: they carry no gradient
        read, d_features = jax.tree.map(lambda x: (x * g).astype(x.dtype), grads)
        it = iter(read)
        d_leaves = [next(it) if u else jnp.zeros(x.shape, x.dtype)
                    for x, u in zip(shapes, used, strict=True)]
        return d_leaves, d_features

    shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
    run.defvjp(run_fwd, run_bwd)
    value, sums = run(leaves, features)
    return value, jax.lax.stop_gradient(sums)


def _leaves_read(fn: Callable, leaves: list, treedef, features) -> list[bool]:
    """Which of `leaves` (of a params tree) `fn(params, features)` reads, from its jaxpr."""
    closed = jax.make_jaxpr(lambda *xs: fn(jax.tree.unflatten(treedef, xs), features))(*leaves)
    jaxpr = closed.jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in jaxpr.outvars}
    return [id(v) in read for v in jaxpr.invars]


def chunked_distill_loss(
    features: jax.Array,
    student_head: Callable,
    head_params,
    teacher_inputs: jax.Array,
    teacher_head: Callable | None = None,
    teacher_params=None,
    labels: jax.Array | None = None,
    *,
    alpha: float | jax.Array = 0.0,
    axis_name: str | None = None,
    mask: jax.Array | None = None,
    label_mask: jax.Array | None = None,
    **kwargs,
) -> tuple[LossParts, dict[str, jax.Array]]:
    """`finish_distill(chunked_distill_sums(...))` in value and gradient, the gradient taken
    chunk by chunk in the forward pass (`chunked_distill_objective`): what the distillation
    step runs with a `student_head`.

    The loss is linear in the two sums, with factors set by the global counts (the batch's
    `mask` and `label_mask`, known before any chunk runs); they are read off `finish_loss`
    itself. Should the counts of the chunks differ from them, the loss is NaN (a bug, never
    a wrong gradient). `kwargs`: the other arguments of `chunked_distill_sums`.

    Returns:
      `(LossParts, metrics)` as `finish_distill`; only `LossParts.loss` is differentiable.
    """
    b, length = jnp.shape(features)[:2]
    m = jnp.ones((b, length), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    n_soft = jnp.sum(m)
    n_hard = (jnp.zeros((), jnp.float32) if labels is None
              else jnp.sum(combine_masks(m, label_mask)))

    def loss_of(soft, hard):
        return finish_loss(LossSums(soft, hard, n_soft, n_hard), alpha=alpha,
                           axis_name=axis_name).loss

    zero = jnp.zeros((), jnp.float32)
    soft_scale, hard_scale = jax.grad(loss_of, argnums=(0, 1))(zero, zero)
    objective, sums = chunked_distill_objective(
        features, student_head, head_params, teacher_inputs, teacher_head, teacher_params,
        labels, soft_scale=soft_scale, hard_scale=hard_scale, mask=mask,
        label_mask=label_mask, **kwargs)
    parts, metrics = finish_distill(sums, alpha=alpha, axis_name=axis_name)
    same = (jnp.isclose(sums.loss.soft_count, n_soft, rtol=1e-5)
            & jnp.isclose(sums.loss.hard_count, n_hard, rtol=1e-5))
    loss = parts.loss + (objective - jax.lax.stop_gradient(objective))
    return parts._replace(loss=jnp.where(same, loss, jnp.nan)), metrics


def _add_sums(total: DistillSums, s: DistillSums) -> DistillSums:
    """Two chunks' `DistillSums` as one: sums add, `finite` is the minimum."""
    out = jax.tree.map(jnp.add, total._replace(finite=jnp.zeros(())),
                       s._replace(finite=jnp.zeros(())))
    return out._replace(finite=jnp.minimum(total.finite, s.finite))


def _chunk_plan(features, student_head, head_params, teacher_inputs, teacher_head,
                teacher_params, labels, *, mask, label_mask, chunk_size, temperature,
                weighting, soft_loss, divergence_kind, known, available, unmatched,
                student_unmatched, uld_weight):
    """The checked inputs of a chunked loss: `(one, args, num, (start_of, size))`,
    `one(*args, i)` the `DistillSums` of chunk i (of `num`; positions `start_of(i)` to
    `start_of(i) + size`; `features_chunk=` gives that chunk's features already sliced),
    `args[:2]` = `(head_params, features)`."""
    chunk_size = _checks.check_int(chunk_size, "chunk_size")
    if jnp.ndim(features) != 3:
        raise ValueError(
            f"`features` must have shape [B, L, H] (a sequence batch), got {jnp.shape(features)}."
        )
    b, length = features.shape[:2]
    if isinstance(teacher_inputs, tuple):  # top-k entries (`distill_sums`)
        if teacher_head is not None:
            raise ValueError("`teacher_head` runs online teachers; teacher top-k entries are "
                             "precomputed: pass teacher_head=None.")
        _check_top_k_use(temperature, known, available, unmatched)
        teacher_inputs = check_top_k_inputs(teacher_inputs, (b, length))
        positions = tuple(jnp.shape(teacher_inputs[1])[:3])
    elif jnp.ndim(teacher_inputs) != 4 or tuple(teacher_inputs.shape[1:3]) != (b, length):
        raise ValueError(
            f"`teacher_inputs` must have shape [K, B, L, V] (or [K, B, L, H_t] with "
            f"`teacher_head`) with [B, L]=({b}, {length}), got {jnp.shape(teacher_inputs)}."
        )
    else:
        positions = tuple(teacher_inputs.shape[:3])
    teacher_inputs = jax.lax.stop_gradient(teacher_inputs)
    size = min(chunk_size, length)
    num = -(-length // size)
    label_mask_per_token = label_mask is not None and jnp.ndim(label_mask) == 2

    def start_of(i):
        return jnp.minimum(i * size, length - size)

    def one(head_params, features, teacher_inputs, teacher_params, labels, mask, label_mask,
            available, unmatched, i, features_chunk=None):
        start = start_of(i)
        fresh = (start + jnp.arange(size)) >= i * size  # the overlap is counted once
        m = jnp.broadcast_to(fresh, (b, size)).astype(jnp.float32)
        if mask is not None:
            m = m * _chunk(mask, start, size, 1).astype(jnp.float32)
        lm = _chunk(label_mask, start, size, 1) if label_mask_per_token else label_mask
        zt = jax.tree.map(lambda a: _chunk(a, start, size, 2), teacher_inputs)
        if teacher_head is not None:
            zt = jax.lax.stop_gradient(teacher_head(teacher_params, zt))
        if features_chunk is None:
            features_chunk = _chunk(features, start, size, 1)
        logits = student_head(head_params, features_chunk)
        y = None if labels is None else _chunk(labels, start, size, 1)
        av = None if available is None else _chunk(available, start, size, 2)
        un = None if unmatched is None else _chunk(unmatched, start, size, 2)
        return distill_sums(logits, zt, y, mask=m, label_mask=lm, temperature=temperature,
                            weighting=weighting, soft_loss=soft_loss,
                            divergence_kind=divergence_kind, known=known, available=av,
                            unmatched=un, student_unmatched=student_unmatched,
                            uld_weight=uld_weight)

    if available is not None and tuple(jnp.shape(available)) != positions:
        raise ValueError(f"`available` must have shape [K, B, L]={positions}, "
                         f"got {jnp.shape(available)}.")
    if unmatched is not None and (jnp.ndim(unmatched) != 4 or tuple(jnp.shape(unmatched)[:3])
                                  != positions):
        raise ValueError(f"`unmatched` must have shape [K, B, L, M + 1] with [K, B, L]="
                         f"{positions}, got {jnp.shape(unmatched)}.")
    args = (head_params, features, teacher_inputs, teacher_params, labels, mask, label_mask,
            available, unmatched)
    return one, args, num, (start_of, size)
