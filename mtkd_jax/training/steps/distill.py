r"""The multi-teacher distillation step: teachers -> targets -> loss -> student update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.divergence import DIVERGENCES
from mtkd_jax.core.reduce import as_varying, pmean
from mtkd_jax.objective.loss import (
    DEFAULT_CHUNK_SIZE,
    chunked_distill_loss,
    distill_sums,
    finish_distill,
)
from mtkd_jax.training.batch import batch_parts, teacher_logits_of
from mtkd_jax.training.state import TrainState
from mtkd_jax.training.steps.common import (
    ApplyFn,
    AugmentFn,
    apply_update,
    check_concrete_batch,
    check_config,
    forward,
    labels_in_range,
    trained_model,
    update_keys,
)
from mtkd_jax.weighting import get_weighting

__all__ = ["make_distill_step"]


def make_distill_step(
    student_apply: ApplyFn,
    teacher_apply: ApplyFn | None,
    tx: optax.GradientTransformation,
    *,
    weighting: str | Callable = "uniform",
    soft_loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    divergence_kind: str = "squared",
    augment_fn: AugmentFn | None = None,
    axis_name: str | None = None,
    pass_key: bool = False,
    student_head: Callable | None = None,
    teacher_head: Callable | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    known=None,
    student_unmatched=None,
    uld_weight: float = 1.0,
) -> Callable:
    r"""Build a multi-teacher distillation step that updates only the student.

    Per batch: teacher logits `[K, B, C]` -> `distill_targets` (softmax at T, weights, fused
    target) -> `mean_distillation_loss`
    :math:`(1-\alpha)\,\overline{\ell_{soft}(s, t)} + \alpha\,\overline{CE(s, y)}_{labeled}`
    -> optax update. Teachers and student see the same (augmented) batch.

    Sequence batches (`batch["y"]` `[B, L]`, padding mask `batch["mask"]` `[B, L]`, logits
    `[B, L, V]`, teacher logits `[K, B, L, V]`) are the same step over tokens: weights are
    per token `[K, B, L]`, and the loss and every metric are means over the valid tokens of
    the global batch (padding counts nowhere). With `student_head`, the student returns
    features `[B, L, H]` and the soft loss runs in chunks of `chunk_size` positions
    (`mtkd_jax.objective.loss`), so the `[B, L, V]` and `[K, B, L, V]` arrays are never
    held whole; the gradients are those of the unchunked step.

    Metrics (global-batch means): ``loss``, ``soft_loss``, ``hard_loss`` (0 without labels),
    ``teacher_weights`` `[K]`, ``teacher_divergence`` `[K, K]` (`pairwise_divergence` of the
    teacher probabilities at T), ``agreement`` (student argmax = fused-target argmax),
    ``accuracy`` (over labeled examples, with labels), ``teacher_logits_finite`` (1 when every
    teacher logit of the batch is finite, so a NaN loss can be traced to the teachers),
    ``labels_in_range`` (with labels: 1 when every counted label is in `[0, C)`, C the
    logits' classes; `loop.fit` names labels when it is not). Called eagerly (concrete
    values), the step checks its batch on the host (`batch.check_batch`, C from the logits).

    Args:
      student_apply: the student: a `mtkd_jax.models.Model` (Dropout keys from this update's
        key, BatchNorm statistics updated in `state.model_state`), a Flax Linen or NNX
        module, or a plain `apply(params, x) -> [B, C]` (or `apply(params, x, key)`,
        `pass_key`).
      teacher_apply: `apply(teacher_params, x) -> [K, B, C]`, frozen, in evaluation mode
        (e.g. `mtkd_jax.teachers.make_stacked_apply`), or None to read
        `batch["teacher_logits"]`, or `batch["teacher_top_k"]` (top-k cache entries,
        `mtkd_jax.cache.with_cached_top_k`), distilled in their slot space without expanding
        them to V (`mtkd_jax.objective.top_k_slots`; T = 1).
      tx: optax optimizer for the student.
      weighting: a name in `mtkd_jax.weighting.WEIGHTINGS` or a strategy function.
      soft_loss: ``"kl"`` (T^2-scaled KL) or ``"mse"`` (the article's squared error).
      temperature: T > 0.
      alpha: hard-label weight in [0, 1].
      divergence_kind: kind for the divergence metric (see `pairwise_divergence`).
      augment_fn: optional `augment_fn(key, x) -> x`; needs online teachers (cached logits
        belong to fixed inputs: cache augmented views instead, `mtkd_jax.cache`).
      axis_name: None for a global-batch step; a mapped axis name for a per-device step that
        pmean's gradients and metrics over it (`shard_map`, `pmap`).
      pass_key: for a plain function: call `student_apply(params, x, key)` with this
        update's key.
      student_head: optional `student_head(params, features [B, c, H]) -> [B, c, V]`: then
        `student_apply` returns features `[B, L, H]` and the loss is chunked.
      teacher_head: optional `teacher_head(teacher_params, [K, B, c, H_t]) -> [K, B, c, V]`
        (with `student_head`): then `teacher_apply` returns features `[K, B, L, H_t]`.
      chunk_size: positions per chunk with `student_head` (static).
      known: optional `[K, C]` bool, the classes each teacher knows, for teachers with
        different class sets (`mtkd_jax.core.class_sets`): the teachers' logits are global-space
        `[K, ..., C]` (`class_sets.to_global_logits`), unknown entries may hold anything
        (-inf included); targets are fused as in `distill_targets(known=...)`, the
        divergence metric is taken over the classes each pair shares
        (`class_sets.pairwise_divergence_known`) and ``teacher_logits_finite`` looks at
        known entries only. None: every teacher knows every class (a full mask gives the
        same numbers).
      student_unmatched: optional bool `[K, V]` (`cross_tokenizer.student_unmatched`): the
        student's side of the ULD term, needed when batches hold ``"teacher_unmatched"``.
      uld_weight: the ULD term's weight (see below).

    Teachers with their own tokenizers (`mtkd_jax.objective.cross_tokenizer`): their logits,
    aligned to the student's positions and projected onto its vocabulary, come as teacher
    logits `[K, B, L, V]` with ``batch["teacher_available"]`` `[K, B, L]` (1 where teacher k
    can speak at a student position): the weights are taken over the teachers available at
    each token (`distill_targets(available=)`), a token no teacher can speak at has soft
    loss 0 and is counted, and the metrics add ``teacher_available`` `[K]` and
    ``unaligned``. With the ``"uld"`` projection, ``batch["teacher_unmatched"]``
    `[K, B, L, M + 1]` adds ULD's sorted L1 on the unmatched part to the soft loss
    (`distill_sums(unmatched=)`), with `student_unmatched` `[K, V]`
    (`cross_tokenizer.student_unmatched`) and its weight `uld_weight`.

    Returns:
      Un-jitted `step(state, batch, key, *, teacher_params=None) -> (state, metrics)`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_train_state
      >>> from mtkd_jax.training.steps import make_distill_step
      >>> student = lambda p, x: x @ p
      >>> teachers = lambda tp, x: jnp.stack([x @ w for w in tp])          # [K, B, C]
      >>> tx = optax.sgd(0.1)
      >>> step = jax.jit(make_distill_step(student, teachers, tx, temperature=2.0))
      >>> tp = (jnp.eye(3), -jnp.eye(3))
      >>> state = init_train_state(jnp.zeros((3, 3)), tx)
      >>> batch = {"x": jnp.eye(3), "y": jnp.arange(3)}
      >>> state, m = step(state, batch, jax.random.key(0), teacher_params=tp)
      >>> int(state.step), m["teacher_weights"].tolist()
      (1, [0.5, 0.5])
    """
    soft_fn = check_config(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
    weighting_fn = get_weighting(weighting)
    if divergence_kind not in DIVERGENCES:
        raise ValueError(
            f"`divergence_kind` must be one of {sorted(DIVERGENCES)}, got {divergence_kind!r}."
        )
    if augment_fn is not None and teacher_apply is None:
        raise ValueError(
            "`augment_fn` needs online teachers (`teacher_apply`): precomputed teacher logits "
            "belong to the unaugmented inputs. Cache augmented views instead "
            "(`mtkd_jax.cache.augment_view`)."
        )
    if teacher_head is not None and (student_head is None or teacher_apply is None):
        raise ValueError(
            "`teacher_head` chunks online teachers' output heads: it needs `teacher_apply` "
            "(returning features) and `student_head` (the chunked loss)."
        )
    if student_head is not None:
        _checks.check_int(chunk_size, "chunk_size")
    model = trained_model(student_apply, pass_key)

    def step(state: TrainState, batch: dict, key: jax.Array, *, teacher_params=None):
        parts = batch_parts(batch)
        labels = parts.labels
        aug_key, model_key = update_keys(key, state, augment_fn is not None, axis_name)
        x = parts.x if augment_fn is None else augment_fn(aug_key, parts.x)
        lead = parts.lead
        teacher_out = teacher_logits_of(batch, x, teacher_apply, teacher_params, lead=lead)
        top_k = isinstance(teacher_out, tuple)  # top-k entries: the slot-space loss
        shape = teacher_out[1].shape if top_k else teacher_out.shape
        if student_head is not None and len(shape) != 4:
            raise ValueError(
                "`student_head` (the chunked loss) needs a sequence batch: teacher logits "
                f"[K, B, L, V] and `batch['mask']` or `batch['y']` [B, L]; got teacher "
                f"outputs {shape}."
            )
        lead = lead or shape[1:-1]
        # The teachers' last axis is V, except with top-k entries or `teacher_head` (then
        # the teachers give features): V is read off the student's head below.
        vocab_from_student = top_k or teacher_head is not None
        check_concrete_batch(batch, None if vocab_from_student else shape[-1])
        available = batch.get("teacher_available")  # teachers with their own tokenizers
        unmatched = batch.get("teacher_unmatched")
        if unmatched is not None and student_unmatched is None:
            raise ValueError("`batch['teacher_unmatched']` (the ULD term) needs the step's "
                             "`student_unmatched` [K, V] (cross_tokenizer.student_unmatched).")
        uld = dict(available=available, unmatched=unmatched,
                   student_unmatched=student_unmatched, uld_weight=uld_weight)
        _checks.check_labels_for_alpha(labels, alpha)

        classes = []  # V, read off the student's logits while tracing (top-k entries)

        def loss_fn(params):
            out, model_state = forward(model, params, state.model_state, x, model_key,
                                       parts.size, "student_apply", lead=lead)
            if vocab_from_student:
                head = (out if student_head is None else jax.eval_shape(
                    student_head, params, out[:, :1]))
                classes.append(head.shape[-1])
            if student_head is None:
                sums = distill_sums(
                    out, teacher_out, labels, mask=parts.mask, label_mask=parts.label_mask,
                    temperature=temperature, weighting=weighting_fn, soft_loss=soft_fn,
                    divergence_kind=divergence_kind, known=known, **uld,
                )
                loss, metrics = finish_distill(sums, alpha=alpha, axis_name=axis_name)
            else:  # each chunk's gradient taken in the forward pass: nothing recomputed
                loss, metrics = chunked_distill_loss(
                    out, student_head, params, teacher_out, teacher_head, teacher_params,
                    labels, alpha=alpha, axis_name=axis_name, mask=parts.mask,
                    label_mask=parts.label_mask, chunk_size=chunk_size,
                    temperature=temperature, weighting=weighting_fn, soft_loss=soft_fn,
                    divergence_kind=divergence_kind, known=known, **uld,
                )
            return loss.loss, (loss, metrics, model_state)

        grads, (loss, metrics, model_state) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        metrics = {"loss": loss.loss, "soft_loss": loss.soft, "hard_loss": loss.hard, **metrics}
        if labels is None:
            del metrics["accuracy"]
        else:
            metrics["labels_in_range"] = labels_in_range(
                labels, parts.hard_mask, classes[0] if vocab_from_student else shape[-1])
        new_state = apply_update(tx, state, grads, axis_name, model_state)
        return new_state, pmean(metrics, axis_name)

    return step
