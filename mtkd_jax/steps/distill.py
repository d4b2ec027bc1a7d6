r"""The multi-teacher distillation step: teachers -> targets -> loss -> student update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mtkd_jax.batch import batch_parts, teacher_logits_of
from mtkd_jax.class_sets import pairwise_divergence_known
from mtkd_jax.divergence import DIVERGENCES, pairwise_divergence
from mtkd_jax.losses import mean_distillation_loss
from mtkd_jax.reduce import as_varying, global_mean, pmean
from mtkd_jax.state import TrainState
from mtkd_jax.steps._common import (
    ApplyFn,
    AugmentFn,
    accuracy,
    apply_update,
    check_config,
    forward,
    trained_model,
    update_keys,
)
from mtkd_jax.targets import distill_targets
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
    known=None,
) -> Callable:
    r"""Build a multi-teacher distillation step that updates only the student.

    Per batch: teacher logits `[K, B, C]` -> `distill_targets` (softmax at T, weights, fused
    target) -> `mean_distillation_loss`
    :math:`(1-\alpha)\,\overline{\ell_{soft}(s, t)} + \alpha\,\overline{CE(s, y)}_{labeled}`
    -> optax update. Teachers and student see the same (augmented) batch.

    Metrics (global-batch means): ``loss``, ``soft_loss``, ``hard_loss`` (0 without labels),
    ``teacher_weights`` `[K]`, ``teacher_divergence`` `[K, K]` (`pairwise_divergence` of the
    teacher probabilities at T), ``agreement`` (student argmax = fused-target argmax),
    ``accuracy`` (over labeled examples, with labels), ``teacher_logits_finite`` (1 when every
    teacher logit of the batch is finite, so a NaN loss can be traced to the teachers).

    Args:
      student_apply: the student: a `mtkd_jax.models.Model` (Dropout keys from this update's
        key, BatchNorm statistics updated in `state.model_state`), a Flax Linen or NNX
        module, or a plain `apply(params, x) -> [B, C]` (or `apply(params, x, key)`,
        `pass_key`).
      teacher_apply: `apply(teacher_params, x) -> [K, B, C]`, frozen, in evaluation mode
        (e.g. `mtkd_jax.teachers.make_stacked_apply`), or None to read
        `batch["teacher_logits"]`.
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
      known: optional `[K, C]` bool, the classes each teacher knows, for teachers with
        different class sets (`mtkd_jax.class_sets`): the teachers' logits are global-space
        `[K, B, C]` (`class_sets.to_global_logits`), unknown entries may hold anything
        (-inf included); targets are fused as in `distill_targets(known=...)`, the
        divergence metric is taken over the classes each pair shares
        (`pairwise_divergence_known`) and ``teacher_logits_finite`` looks at known entries
        only. None: every teacher knows every class (a full mask gives the same numbers).

    Returns:
      Un-jitted `step(state, batch, key, *, teacher_params=None) -> (state, metrics)`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.state import init_train_state
      >>> from mtkd_jax.steps import make_distill_step
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
    check_config(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
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
    model = trained_model(student_apply, pass_key)

    def step(state: TrainState, batch: dict, key: jax.Array, *, teacher_params=None):
        x, labels, mask, b = batch_parts(batch)
        aug_key, model_key = update_keys(key, state, augment_fn is not None)
        if augment_fn is not None:
            x = augment_fn(aug_key, x)
        teacher_logits = teacher_logits_of(batch, x, teacher_apply, teacher_params)
        dt = distill_targets(
            teacher_logits, labels, label_mask=mask, temperature=temperature,
            weighting=weighting_fn, known=known,
        )
        targets = jax.lax.stop_gradient(dt.targets)

        def loss_fn(params):
            logits, model_state = forward(
                model, params, state.model_state, x, model_key, b, "student_apply"
            )
            if logits.shape[-1] != targets.shape[-1]:
                raise ValueError(
                    f"the student predicts {logits.shape[-1]} classes but the teachers "
                    f"{targets.shape[-1]} (teacher logits {teacher_logits.shape}); they must "
                    "share the class count."
                )
            parts = mean_distillation_loss(
                logits, targets, labels, alpha=alpha, temperature=temperature,
                soft_loss=soft_loss, label_mask=mask, axis_name=axis_name,
            )
            return parts.loss, (logits, parts, model_state)

        grads, (logits, parts, model_state) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        k = dt.probs.shape[0]
        if k > 1 and known is not None:
            div = global_mean(pairwise_divergence_known(dt.probs, known, kind=divergence_kind),
                              axis_name=axis_name)
        elif k > 1:
            div = global_mean(pairwise_divergence(dt.probs, kind=divergence_kind),
                              axis_name=axis_name)
        else:
            div = jnp.zeros((1, 1), dt.probs.dtype)
        metrics = {
            "loss": parts.loss,
            "soft_loss": parts.soft,
            "hard_loss": parts.hard,
            "teacher_weights": global_mean(dt.weights.T, axis_name=axis_name),
            "teacher_divergence": div,
            "agreement": global_mean(
                jnp.argmax(logits, -1) == jnp.argmax(targets, -1), axis_name=axis_name
            ),
            "teacher_logits_finite": _all_finite(teacher_logits, known),
        }
        if labels is not None:
            metrics["accuracy"] = accuracy(logits, labels, mask, axis_name)
        new_state = apply_update(tx, state, grads, axis_name, model_state)
        return new_state, pmean(metrics, axis_name)

    return step


def _all_finite(teacher_logits: jax.Array, known) -> jax.Array:
    """1.0 when every teacher logit of a known class is finite (all of them without `known`)."""
    finite = jnp.isfinite(teacher_logits)
    if known is not None:
        k, c = teacher_logits.shape[0], teacher_logits.shape[-1]
        shape = (k,) + (1,) * (teacher_logits.ndim - 2) + (c,)
        finite = finite | ~jnp.asarray(known, bool).reshape(shape)
    return jnp.all(finite).astype(jnp.float32)
