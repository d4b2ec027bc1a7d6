"""Train state and train steps: multi-teacher distillation, codistillation, supervised, eval.

Every step is a pure function built by a small factory, with the optimizer and the apply
functions in its closure and only data in the state:

    step(state, batch, key, teacher_params=None) -> (state, metrics)

`batch` is a dict `{"x": [B, ...], "y": [B] int, "label_mask": [B] (optional, 1 = labeled),
"teacher_logits": [K, B, C] (optional, precomputed)}`. Only the student is differentiated;
teachers are frozen (`stop_gradient`). Per-step randomness comes from
`jax.random.fold_in(key, state.step)`. A step built with `axis_name=None` is compiled over
the global batch (`jax.jit`, or `mtkd_jax.parallel.data_parallel_step`); built with
`axis_name="data"` it is a per-device step that averages gradients and metrics over that axis
itself, for `jax.shard_map` or a user's own `jax.pmap`.

Losses are means over the examples of the global batch; the hard-label term is a mean over
the labeled examples only (`label_mask`), however they fall across devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtkd_jax import _checks
from mtkd_jax.divergence import DIVERGENCES, pairwise_divergence, softmax_t
from mtkd_jax.losses import SOFT_LOSSES, cross_entropy
from mtkd_jax.metrics import MetricStats, batch_stats, compute_metrics, merge_stats
from mtkd_jax.parallel import as_varying, global_mean
from mtkd_jax.targets import fuse_targets, leave_one_out_targets
from mtkd_jax.weighting import get_weighting

__all__ = [
    "TrainState",
    "init_train_state",
    "init_stacked_train_state",
    "DistillTargets",
    "distill_targets",
    "check_batch",
    "make_distill_step",
    "make_codistill_step",
    "make_supervised_step",
    "make_eval_step",
    "evaluate",
]

ApplyFn = Callable[..., jax.Array]


class TrainState(NamedTuple):
    """Data only: `step` (int32 scalar array), `params` and `opt_state` pytrees."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    """A fresh `TrainState` at step 0 with `tx.init(params)`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.train import init_train_state
      >>> s = init_train_state({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> int(s.step), s.step.dtype
      (0, dtype('int32'))
    """
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_stacked_train_state(stacked_params, tx: optax.GradientTransformation) -> TrainState:
    """`TrainState` for K models stacked on a leading axis: one optimizer state per model.

    Args:
      stacked_params: pytree whose leaves are `[K, ...]`.
      tx: the optimizer, initialised once per model with `jax.vmap(tx.init)`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.train import init_stacked_train_state
      >>> s = init_stacked_train_state({"w": jnp.zeros((2, 3))}, optax.adam(1e-3))
      >>> s.opt_state[0].mu["w"].shape
      (2, 3)
    """
    _num_models(stacked_params)
    return TrainState(jnp.zeros((), jnp.int32), stacked_params, jax.vmap(tx.init)(stacked_params))


def _num_models(stacked_params) -> int:
    leaves = jax.tree.leaves(stacked_params)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "`stacked_params` leaves must all share a leading model axis K; got leading sizes "
            f"{sorted(sizes, key=str)}."
        )
    return sizes.pop()


# ---------------------------------------------------------------------------------------------
# Batch checks


def _batch_parts(batch) -> tuple[jax.Array, jax.Array | None, jax.Array | None, int]:
    """Trace-time shape checks; returns x, labels, label mask and the batch size B."""
    if not isinstance(batch, dict) or "x" not in batch:
        raise ValueError(
            "`batch` must be a dict with at least 'x' [B, ...] (and 'y' [B] int labels, "
            f"optional 'label_mask' [B], 'teacher_logits' [K, B, C]); got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
            + "."
        )
    x = batch["x"]
    if jnp.ndim(x) < 1:
        raise ValueError(f"`batch['x']` must have a leading batch axis, got shape {jnp.shape(x)}.")
    b = jnp.shape(x)[0]
    labels = batch.get("y")
    if labels is not None:
        _checks.check_labels(labels, "batch['y']", (b,))
    mask = batch.get("label_mask")
    if mask is not None and jnp.shape(mask) != (b,):
        raise ValueError(
            f"`batch['label_mask']` must have shape [B]=({b},), got {jnp.shape(mask)}."
        )
    if mask is not None and labels is None:
        raise ValueError("`batch['label_mask']` is given but `batch['y']` (the labels) is not.")
    tl = batch.get("teacher_logits")
    if tl is not None and (jnp.ndim(tl) != 3 or jnp.shape(tl)[1] != b):
        raise ValueError(
            f"`batch['teacher_logits']` must have shape [K, B, C] with B={b} (the batch size of "
            f"'x'), got {jnp.shape(tl)}."
        )
    return x, labels, mask, b


def _check_label_values(labels, mask, num_classes: int) -> None:
    """Range check on concrete labels (on the host); traced labels cannot be inspected."""
    if labels is None or _checks.is_traced(labels):
        return
    if mask is not None and _checks.is_traced(mask):
        return
    y = np.asarray(labels)
    if mask is not None:
        y = y[np.asarray(mask) > 0]
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise ValueError(
            f"`batch['y']` labels must be in [0, {num_classes}) (the number of classes); found "
            f"{np.unique(y[bad]).tolist()[:10]}. Mark transfer-set examples without a label "
            "with batch['label_mask'] = 0 instead."
        )


def check_batch(batch: dict, *, num_classes: int | None = None) -> int:
    """Check a batch on the host before it enters a compiled step.

    Shapes always; label values when `num_classes` is given and the labels are concrete
    (inside `jax.jit` they are not, and an out-of-range label would silently give a NaN or a
    wrong loss, so training loops call this on the host batch).

    Args:
      batch: `{"x": [B, ...], "y": [B] int, "label_mask": [B] (optional),
        "teacher_logits": [K, B, C] (optional)}`.
      num_classes: C, to check labels in `[0, C)` (only where `label_mask` is 1).

    Returns:
      The batch size B.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.train import check_batch
      >>> check_batch({"x": np.zeros((2, 3)), "y": np.array([0, 1])}, num_classes=2)
      2
      >>> check_batch({"x": np.zeros((2, 3)), "y": np.array([0, 2])}, num_classes=2)
      Traceback (most recent call last):
      ...
      ValueError: `batch['y']` labels must be in [0, 2) (the number of classes); found [2]. ...
    """
    _, labels, mask, b = _batch_parts(batch)
    tl = batch.get("teacher_logits")
    if tl is not None and num_classes is not None and jnp.shape(tl)[-1] != num_classes:
        raise ValueError(
            f"`batch['teacher_logits']` has {jnp.shape(tl)[-1]} classes (shape "
            f"{jnp.shape(tl)}) but num_classes={num_classes}."
        )
    if num_classes is not None:
        _check_label_values(labels, mask, num_classes)
    return b


def _check_student_classes(logits, num_classes: int, b: int) -> None:
    if jnp.shape(logits) != (b, num_classes):
        raise ValueError(
            f"The student's logits have shape {jnp.shape(logits)} but the teachers predict "
            f"{num_classes} classes for a batch of {b}: expected [B, C]=({b}, {num_classes}). "
            "Student and teachers must share the class count."
        )


def _check_static(*, soft_loss: str, temperature, alpha) -> None:
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    _checks.check_temperature(temperature)
    if not _checks.is_traced(alpha) and not np.all((np.asarray(alpha) >= 0) & (alpha <= 1)):
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")


def _alpha_is_zero(alpha) -> bool:
    return not _checks.is_traced(alpha) and not np.any(np.asarray(alpha))


def _label_weights(labels, mask, b: int) -> jax.Array | None:
    if labels is None:
        return None
    return jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)


def _hard_loss(logits, labels, lab_w, axis_name):
    """Mean CE over the labeled examples of the global batch; 0 without labels."""
    if labels is None:
        return jnp.zeros((), jnp.float32)
    # Unlabeled rows may hold placeholder labels (e.g. -1); a valid index keeps CE finite.
    y = jnp.where(lab_w > 0, labels, 0)
    return global_mean(cross_entropy(logits, y), lab_w, axis_name=axis_name)


def _accuracy(logits, labels, lab_w, axis_name):
    correct = jnp.argmax(logits, axis=-1) == jnp.where(lab_w > 0, labels, 0)
    return global_mean(correct, lab_w, axis_name=axis_name)


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _apply(apply_fn, params, x, key, pass_key: bool):
    return apply_fn(params, x, key) if pass_key else apply_fn(params, x)


def _record_axis(step, axis_name):
    # data_parallel_step reads this to refuse a step built for the other mode.
    step.axis_name = axis_name
    return step


# ---------------------------------------------------------------------------------------------
# Distillation targets


class DistillTargets(NamedTuple):
    """What the teachers give the student for one batch.

    Attributes:
      targets: `[B, C]` fused target distribution (at the distillation temperature).
      weights: `[K, B]` per-example teacher weights, summing to 1 over K.
      probs: `[K, B, C]` teacher probabilities at the distillation temperature.
    """

    targets: jax.Array
    weights: jax.Array
    probs: jax.Array


def _weighting_labels(teacher_logits, labels, label_mask):
    """Labels for weightings that need them: true labels where known, else the ensemble's.

    The ensemble argmax (mean of teacher probabilities at T = 1) stands in for the label of
    unlabeled transfer-set examples, so label-based weightings (confidence) still apply.
    """
    ensemble = jnp.argmax(jnp.mean(jax.nn.softmax(teacher_logits, axis=-1), axis=0), axis=-1)
    if labels is None:
        return ensemble.astype(jnp.int32)
    if label_mask is None:
        return labels
    return jnp.where(jnp.asarray(label_mask) > 0, labels, ensemble.astype(labels.dtype))


def _teacher_weights(weighting_fn, probs, teacher_logits, labels, label_mask) -> jax.Array:
    k, b = probs.shape[:2]
    w = weighting_fn(
        probs, logits=teacher_logits, labels=_weighting_labels(teacher_logits, labels, label_mask)
    )
    w = jnp.asarray(w, probs.dtype)
    if w.shape == (k,):
        w = jnp.broadcast_to(w[:, None], (k, b))
    if w.shape != (k, b):
        raise ValueError(
            f"The weighting returned shape {w.shape}; expected [K]=({k},) or [K, B]=({k}, {b})."
        )
    return w


def distill_targets(
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 1.0,
    weighting: str | Callable = "uniform",
    label_mask: jax.Array | None = None,
) -> DistillTargets:
    r"""Teacher logits -> fused target, per-example teacher weights, teacher probabilities.

    :math:`p_k = \mathrm{softmax}(z_k / T)`, :math:`w = \mathrm{weighting}(p)` and
    :math:`t = \sum_k w_k p_k` (a mean of **probabilities**, see `mtkd_jax.fuse_targets`).
    Weightings that need labels (``"confidence"``) get the true label of labeled examples and
    the teacher ensemble's argmax for unlabeled ones (`label_mask` 0, or no `labels`).
    The distill step uses this function, so precomputed teacher logits (a cache) give the
    same targets.

    Args:
      teacher_logits: `[K, B, C]`.
      labels: optional `[B]` int labels.
      temperature: T > 0.
      weighting: a name from `mtkd_jax.weighting.WEIGHTINGS` or a function
        `fn(probs [K, B, C], *, logits, labels) -> [K, B] or [K]` (see `get_weighting`).
      label_mask: optional `[B]`, 1 for labeled examples.

    Returns:
      `DistillTargets(targets [B, C], weights [K, B], probs [K, B, C])`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.train import distill_targets
      >>> z = jnp.log(jnp.array([[[0.2, 0.3, 0.5]], [[0.1, 0.4, 0.5]]]))   # [K=2, B=1, C=3]
      >>> [round(v, 4) for v in distill_targets(z).targets[0].tolist()]
      [0.15, 0.35, 0.5]
    """
    _checks.check_teachers(teacher_logits, "teacher_logits")
    if jnp.ndim(teacher_logits) != 3:
        raise ValueError(
            f"`teacher_logits` must have shape [K, B, C], got {jnp.shape(teacher_logits)}."
        )
    b = teacher_logits.shape[1]
    if labels is not None:
        _checks.check_labels(labels, "labels", (b,))
    if label_mask is not None and jnp.shape(label_mask) != (b,):
        raise ValueError(f"`label_mask` must have shape [B]=({b},), got {jnp.shape(label_mask)}.")
    fn = get_weighting(weighting)
    probs = softmax_t(teacher_logits, temperature=temperature)
    w = _teacher_weights(fn, probs, teacher_logits, labels, label_mask)
    return DistillTargets(fuse_targets(probs, w), w, probs)


# ---------------------------------------------------------------------------------------------
# Steps


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
    axis_name: str | None = None,
    pass_key: bool = False,
) -> Callable:
    r"""Build a multi-teacher distillation step that updates only the student.

    Per batch: teacher logits `[K, B, C]` (from `teacher_apply(teacher_params, x)`, or
    precomputed in `batch["teacher_logits"]` when `teacher_apply` is None) ->
    `distill_targets` (softmax at T, weights, fused target) -> loss
    :math:`(1-\alpha)\,\overline{\ell_{soft}(s, t)} + \alpha\,\overline{CE(s, y)}`, the soft
    mean over all examples and the CE mean over labeled ones (`batch["label_mask"]`), as
    `mtkd_jax.losses.distillation_loss` when every example is labeled -> optax update.

    Metrics (global-batch means): ``loss``, ``soft_loss``, ``hard_loss`` (0 without labels),
    ``teacher_weights`` `[K]`, ``teacher_divergence`` `[K, K]` (`pairwise_divergence` of
    the teacher probabilities at T, averaged over the batch), ``agreement`` (student argmax
    = fused-target argmax), ``accuracy`` (over labeled examples, when labels are given).

    Args:
      student_apply: `apply(params, x) -> [B, C]` (or `apply(params, x, key)`, `pass_key`).
      teacher_apply: `apply(teacher_params, x) -> [K, B, C]` (e.g. from
        `mtkd_jax.teachers`), or None to read `batch["teacher_logits"]`.
      tx: optax optimizer for the student.
      weighting: teacher weighting, name or function (see `distill_targets`).
      soft_loss: ``"kl"`` (T^2-scaled KL) or ``"mse"`` (the article's squared error).
      temperature: T > 0.
      alpha: hard-label weight in [0, 1].
      divergence_kind: kind for the divergence metric (see `pairwise_divergence`).
      axis_name: None for a global-batch step; a mapped axis name for a per-device step that
        pmean's gradients and metrics over it (`shard_map`, `pmap`).
      pass_key: call `student_apply(params, x, key)` with the per-step key
        `fold_in(key, state.step)` (dropout); otherwise the key is unused.

    Returns:
      `step(state, batch, key, teacher_params=None) -> (state, metrics)`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.train import init_train_state, make_distill_step
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
    _check_static(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
    weighting_fn = get_weighting(weighting)
    if divergence_kind not in DIVERGENCES:
        raise ValueError(
            f"`divergence_kind` must be one of {sorted(DIVERGENCES)}, got {divergence_kind!r}."
        )
    soft_fn = SOFT_LOSSES[soft_loss]

    def step(state: TrainState, batch: dict, key: jax.Array, teacher_params=None):
        x, labels, mask, b = _batch_parts(batch)
        if teacher_apply is None:
            if "teacher_logits" not in batch:
                raise ValueError(
                    "`teacher_apply` is None, so the batch must hold precomputed "
                    "'teacher_logits' [K, B, C]; it has keys " + str(sorted(batch)) + "."
                )
            teacher_logits = batch["teacher_logits"]
        else:
            teacher_logits = teacher_apply(teacher_params, x)
            if jnp.ndim(teacher_logits) != 3 or jnp.shape(teacher_logits)[1] != b:
                raise ValueError(
                    f"`teacher_apply` must return [K, B, C] with B={b}, got "
                    f"{jnp.shape(teacher_logits)}."
                )
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        num_classes = teacher_logits.shape[-1]
        _check_label_values(labels, mask, num_classes)
        if labels is None and not _alpha_is_zero(alpha):
            raise ValueError("`alpha` > 0 (the hard-label weight) needs labels in batch['y'].")
        dt = distill_targets(
            teacher_logits, labels, temperature=temperature, weighting=weighting_fn,
            label_mask=mask,
        )
        targets = jax.lax.stop_gradient(dt.targets)
        lab_w = _label_weights(labels, mask, b)
        step_key = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            logits = _apply(student_apply, params, x, step_key, pass_key)
            _check_student_classes(logits, num_classes, b)
            soft = global_mean(
                soft_fn(logits, targets, temperature=temperature), axis_name=axis_name
            )
            hard = _hard_loss(logits, labels, lab_w, axis_name)
            return (1.0 - alpha) * soft + alpha * hard, (logits, soft, hard)

        grads, (logits, soft, hard) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        grads = _pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        k = dt.probs.shape[0]
        if k > 1:
            div = pairwise_divergence(dt.probs, kind=divergence_kind)  # [B, K, K]
            div = global_mean(div, axis_name=axis_name)
        else:
            div = jnp.zeros((1, 1), dt.probs.dtype)
        metrics = {
            "loss": (1.0 - alpha) * soft + alpha * hard,
            "soft_loss": soft,
            "hard_loss": hard,
            "teacher_weights": global_mean(dt.weights.T, axis_name=axis_name),
            "teacher_divergence": div,
            "agreement": global_mean(
                jnp.argmax(logits, -1) == jnp.argmax(targets, -1), axis_name=axis_name
            ),
        }
        if labels is not None:
            metrics["accuracy"] = _accuracy(logits, labels, lab_w, axis_name)
        return TrainState(state.step + 1, params, opt_state), _pmean(metrics, axis_name)

    return _record_axis(step, axis_name)


def make_codistill_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    soft_loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    weights: jax.Array | str | Callable | None = None,
    axis_name: str | None = None,
    pass_key: bool = False,
) -> Callable:
    r"""Build a codistillation step: K models of one architecture refine each other.

    The article's worked project (section 5): every model k moves toward the leave-one-out
    target of the others' **current** predictions,
    :math:`t_k = \sum_{j \ne k} w_j p_j / \sum_{j \ne k} w_j` with :math:`p_j` at temperature
    T (`mtkd_jax.leave_one_out_targets`), held fixed (`stop_gradient`) for the step. All K
    forward passes, losses and optimizer updates run in one vmapped program; model k's
    gradient is that of its own loss only. With ``soft_loss="mse"`` and uniform weights this
    is the article's objective.

    Args:
      apply_fn: `apply(params, x) -> [B, C]` for one model (or with a key, `pass_key`).
      tx: optax optimizer, one state per model (`init_stacked_train_state`).
      soft_loss: ``"kl"`` or ``"mse"``.
      temperature: T > 0.
      alpha: hard-label weight in [0, 1] (labels in `batch["y"]`, masked by `label_mask`).
      weights: None (uniform), a `[K]` array of static weights, or a weighting name/function
        as in `distill_targets`, applied to the models' current predictions.
      axis_name: as in `make_distill_step`.
      pass_key: call `apply_fn(params, x, key)` with a distinct per-step key per model.

    Returns:
      `step(state, batch, key) -> (state, metrics)` for a `TrainState` with stacked params.
      Metrics: ``loss`` (mean over models), ``model_loss``, ``soft_loss``, ``hard_loss``,
      ``accuracy`` (each `[K]`, accuracy only with labels), ``divergence`` `[K, K]`
      (squared, batch mean).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.train import init_stacked_train_state, make_codistill_step
      >>> tx = optax.sgd(0.5)
      >>> step = jax.jit(make_codistill_step(lambda p, x: x @ p, tx, soft_loss="mse"))
      >>> state = init_stacked_train_state(jnp.stack([jnp.eye(2), -jnp.eye(2)]), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.arange(2)}
      >>> for _ in range(20):
      ...     state, m = step(state, batch, jax.random.key(0))
      >>> bool(m["divergence"][0, 1] < 0.01)                      # the two models converged
      True
    """
    _check_static(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
    soft_fn = SOFT_LOSSES[soft_loss]
    if weights is None or not (isinstance(weights, str) or callable(weights)):
        weighting_fn = None
        weights = None if weights is None else jnp.asarray(weights, jnp.float32)
    else:
        weighting_fn = get_weighting(weights)

    def step(state: TrainState, batch: dict, key: jax.Array):
        x, labels, mask, b = _batch_parts(batch)
        k = _num_models(state.params)
        if k < 2:
            raise ValueError(f"Codistillation needs K >= 2 stacked models, got K={k}.")
        if labels is None and not _alpha_is_zero(alpha):
            raise ValueError("`alpha` > 0 (the hard-label weight) needs labels in batch['y'].")
        lab_w = _label_weights(labels, mask, b)
        keys = jax.random.split(jax.random.fold_in(key, state.step), k)

        def loss_fn(params):
            logits = jax.vmap(lambda p, kk: _apply(apply_fn, p, x, kk, pass_key))(params, keys)
            if jnp.ndim(logits) != 3 or logits.shape[1] != b:
                raise ValueError(
                    f"`apply_fn` must return [B, C] with B={b}; stacked it gave "
                    f"{jnp.shape(logits)}."
                )
            frozen = jax.lax.stop_gradient(logits)
            _check_label_values(labels, mask, logits.shape[-1])
            probs = softmax_t(frozen, temperature=temperature)
            if weighting_fn is None:
                w = weights
            else:
                w = _teacher_weights(weighting_fn, probs, frozen, labels, mask)
            targets = jax.lax.stop_gradient(leave_one_out_targets(probs, w))  # [K, B, C]
            per_soft = jax.vmap(lambda s, t: soft_fn(s, t, temperature=temperature))(
                logits, targets
            )  # [K, B]
            soft = global_mean(per_soft.T, axis_name=axis_name)  # [K]
            hard = jax.vmap(lambda s: _hard_loss(s, labels, lab_w, axis_name))(logits)  # [K]
            per_model = (1.0 - alpha) * soft + alpha * hard
            # Targets are constants, so model k's gradient of the sum is that of its own loss.
            return jnp.sum(per_model), (logits, frozen, per_model, soft, hard)

        grads, (logits, frozen, per_model, soft, hard) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        grads = _pmean(grads, axis_name)
        updates, opt_state = jax.vmap(tx.update)(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        probs = softmax_t(frozen, temperature=temperature)
        metrics = {
            "loss": jnp.mean(per_model),
            "model_loss": per_model,
            "soft_loss": soft,
            "hard_loss": hard,
            "divergence": global_mean(pairwise_divergence(probs), axis_name=axis_name),
        }
        if labels is not None:
            metrics["accuracy"] = jax.vmap(lambda s: _accuracy(s, labels, lab_w, axis_name))(
                logits
            )
        return TrainState(state.step + 1, params, opt_state), _pmean(metrics, axis_name)

    return _record_axis(step, axis_name)


def make_supervised_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    pass_key: bool = False,
) -> Callable:
    """Build a plain supervised step: cross-entropy on the labeled examples.

    The baseline of a student trained alone, and how teachers are trained. Examples with
    `batch["label_mask"]` 0 are ignored.

    Args:
      apply_fn: `apply(params, x) -> [B, C]` (or with a key, `pass_key`).
      tx: optax optimizer.
      axis_name: as in `make_distill_step`.
      pass_key: call `apply_fn(params, x, fold_in(key, state.step))`.

    Returns:
      `step(state, batch, key) -> (state, {"loss", "accuracy"})`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.train import init_train_state, make_supervised_step
      >>> tx = optax.sgd(1.0)
      >>> step = jax.jit(make_supervised_step(lambda p, x: x @ p, tx))
      >>> state = init_train_state(jnp.zeros((2, 2)), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([1, 0])}
      >>> state, m0 = step(state, batch, jax.random.key(0))
      >>> state, m1 = step(state, batch, jax.random.key(0))
      >>> bool(m1["loss"] < m0["loss"]), float(m1["accuracy"])
      (True, 1.0)
    """

    def step(state: TrainState, batch: dict, key: jax.Array):
        x, labels, mask, b = _batch_parts(batch)
        if labels is None:
            raise ValueError("A supervised step needs labels in batch['y'].")
        lab_w = _label_weights(labels, mask, b)
        step_key = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            logits = _apply(apply_fn, params, x, step_key, pass_key)
            if jnp.ndim(logits) != 2 or logits.shape[0] != b:
                raise ValueError(f"`apply_fn` must return [B, C] with B={b}, got {logits.shape}.")
            _check_label_values(labels, mask, logits.shape[-1])
            return _hard_loss(logits, labels, lab_w, axis_name), logits

        grads, logits = jax.grad(loss_fn, has_aux=True)(as_varying(state.params, axis_name))
        grads = _pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": _hard_loss(logits, labels, lab_w, axis_name),
            "accuracy": _accuracy(logits, labels, lab_w, axis_name),
        }
        return TrainState(state.step + 1, params, opt_state), _pmean(metrics, axis_name)

    return _record_axis(step, axis_name)


# ---------------------------------------------------------------------------------------------
# Evaluation


def make_eval_step(
    student_apply: ApplyFn | None,
    teacher_apply: ApplyFn | None = None,
    *,
    ensemble_weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> Callable:
    """Build an eval step giving additive metric statistics for the student and the teachers.

    The teacher ensemble is the (weighted) mean of the teachers' probabilities at T = 1, the
    same fusion as the distillation target; agreement is measured against it for the student
    and every teacher. Examples with `batch["label_mask"]` 0 (e.g. padding) are not counted.

    Args:
      student_apply: `apply(params, x) -> [B, C]`, or None to evaluate teachers only.
      teacher_apply: `apply(teacher_params, x) -> [K, B, C]`, or None (then teacher logits
        are read from `batch["teacher_logits"]` when present).
      ensemble_weights: optional `[K]` weights of the ensemble, uniform when None.
      axis_name: psum the statistics over this mapped axis (per-device use).

    Returns:
      `eval_step(params, batch, teacher_params=None) -> dict[str, MetricStats]` with keys
      ``"student"``, ``"teachers"`` (leaves with a leading K axis) and ``"ensemble"`` (the
      last two when teacher logits are available). Sum over batches with
      `mtkd_jax.metrics.merge_stats` (or use `evaluate`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.train import make_eval_step
      >>> from mtkd_jax.metrics import compute_metrics
      >>> import jax
      >>> step = jax.jit(make_eval_step(lambda p, x: x @ p, lambda tp, x: jnp.stack([x, -x])))
      >>> s = step(jnp.eye(2), {"x": jnp.eye(2), "y": jnp.array([0, 1])})
      >>> float(compute_metrics(s["student"])["accuracy"])
      1.0
    """

    def eval_step(params, batch: dict, teacher_params=None) -> dict[str, MetricStats]:
        x, labels, mask, b = _batch_parts(batch)
        if labels is None:
            raise ValueError("Evaluation needs labels in batch['y'].")
        if teacher_apply is not None:
            teacher_logits = teacher_apply(teacher_params, x)
        else:
            teacher_logits = batch.get("teacher_logits")
        logits = None if student_apply is None else student_apply(params, x)
        if teacher_logits is not None:
            if jnp.ndim(teacher_logits) != 3 or jnp.shape(teacher_logits)[1] != b:
                raise ValueError(
                    f"Teacher logits must have shape [K, B, C] with B={b}, got "
                    f"{jnp.shape(teacher_logits)}."
                )
            if logits is not None:
                _check_student_classes(logits, teacher_logits.shape[-1], b)
        for z in (logits, teacher_logits):
            if z is not None:
                _check_label_values(labels, mask, jnp.shape(z)[-1])
        out = {}
        ens = None
        if teacher_logits is not None:
            k = teacher_logits.shape[0]
            probs = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
            w = jnp.full((k,), 1.0 / k) if ensemble_weights is None else ensemble_weights
            ens = fuse_targets(probs, jnp.asarray(w, jnp.float32))
            out["teachers"] = jax.vmap(
                lambda z: batch_stats(z, labels, reference_probs=ens, mask=mask)
            )(teacher_logits)
            ens_logits = jnp.log(jnp.maximum(ens, jnp.finfo(ens.dtype).tiny))
            out["ensemble"] = batch_stats(ens_logits, labels, reference_probs=ens, mask=mask)
        if logits is not None:
            out["student"] = batch_stats(logits, labels, reference_probs=ens, mask=mask)
        if not out:
            raise ValueError(
                "Nothing to evaluate: no `student_apply`, no `teacher_apply` and no "
                "batch['teacher_logits']."
            )
        if axis_name is not None:
            out = jax.tree.map(lambda s: jax.lax.psum(s, axis_name), out)
        return out

    return _record_axis(eval_step, axis_name)


def _summarize(total: dict[str, MetricStats]) -> dict[str, dict[str, jax.Array]]:
    return {
        name: jax.vmap(compute_metrics)(s) if name == "teachers" else compute_metrics(s)
        for name, s in total.items()
    }


def evaluate(
    eval_step: Callable,
    params,
    batches: Iterable[dict],
    *,
    teacher_params=None,
    teacher_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run `eval_step` over `batches` and return metrics side by side.

    Args:
      eval_step: from `make_eval_step` (jitted here; a jitted or data-parallel version, e.g.
        `jax.jit(eval_step)` with sharded inputs, also works).
      params: student params (ignored when the step has no student).
      batches: an iterable of batches (all labeled, or masked with `label_mask`).
      teacher_params: passed to the teachers' apply.
      teacher_names: K names for the teacher rows; default ``teacher_0`` ... ``teacher_{K-1}``.

    Returns:
      `{"student": {...}, "<teacher name>": {...}, ..., "ensemble": {...}}`, each with
      accuracy, precision, recall, f1 (macro), nll, ece, agreement (with the ensemble) and n,
      as Python floats.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.train import make_eval_step, evaluate
      >>> step = make_eval_step(lambda p, x: x @ p, lambda tp, x: jnp.stack([x, -x]))
      >>> batches = [{"x": jnp.eye(2), "y": jnp.array([0, 1])}] * 3
      >>> r = evaluate(step, jnp.eye(2), batches, teacher_names=["good", "bad"])
      >>> sorted(r), r["good"]["accuracy"], r["bad"]["accuracy"], r["student"]["n"]
      (['bad', 'ensemble', 'good', 'student'], 1.0, 0.0, 6.0)
    """
    step, merge = jax.jit(eval_step), jax.jit(merge_stats)
    total = None
    for batch in batches:
        stats = step(params, batch, teacher_params=teacher_params)
        total = stats if total is None else merge(total, stats)
    if total is None:
        raise ValueError("`batches` is empty: nothing to evaluate.")
    summary = jax.device_get(jax.jit(_summarize)(total))

    out = {}
    if "student" in summary:
        out["student"] = {name: float(v) for name, v in summary["student"].items()}
    if "teachers" in summary:
        k = summary["teachers"]["n"].shape[0]
        names = [f"teacher_{i}" for i in range(k)] if teacher_names is None else list(teacher_names)
        if len(names) != k:
            raise ValueError(f"`teacher_names` must have K={k} names, got {len(names)}.")
        for i, name in enumerate(names):
            out[name] = {m: float(v[i]) for m, v in summary["teachers"].items()}
        out["ensemble"] = {name: float(v) for name, v in summary["ensemble"].items()}
    return out
