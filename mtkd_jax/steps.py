r"""Train steps: supervised, multi-teacher distillation, codistillation, K models at once.

Every factory returns an un-jitted pure function (jit it, or wrap it with
`mtkd_jax.parallel.data_parallel_step`), with the optimizer and the apply functions in its
closure and only data in the state (`mtkd_jax.state.TrainState`)::

    step(state, batch, key, *, teacher_params=None) -> (state, metrics)

The data path of a distillation step, one line down the floors: batch (`mtkd_jax.batch`)
-> teacher logits `[K, B, C]` (`teacher_apply(teacher_params, x)`, or precomputed in
`batch["teacher_logits"]`) -> `distill_targets` (softmax at T, teacher weights, fused
target) -> `mean_distillation_loss` -> optax update -> metrics. Only the student is
differentiated; teachers are frozen.

Randomness: the step folds `state.step` into `key` (`jax.random.fold_in(key, state.step)`),
the one place a per-step key is made, so the same `key` can be passed at every step and a
resumed run draws the same numbers. K stacked models (`stacked_step`, codistillation) get
`jax.random.fold_in(key, k)` first.

A step built with `axis_name=None` is compiled over the global batch; built with
`axis_name="data"` it is a per-device step that averages gradients and metrics over that
axis itself, for `jax.shard_map` or a user's own `jax.pmap`. Losses are means over the
examples of the global batch; the hard-label term is a mean over the labeled examples only
(`batch["label_mask"]`), however they fall across devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mtkd_jax import _checks
from mtkd_jax.batch import batch_parts, teacher_logits_of
from mtkd_jax.divergence import DIVERGENCES, pairwise_divergence, softmax_t
from mtkd_jax.losses import SOFT_LOSSES, mean_cross_entropy, mean_distillation_loss
from mtkd_jax.reduce import as_varying, global_mean, pmean
from mtkd_jax.state import TrainState
from mtkd_jax.targets import distill_targets, leave_one_out_targets
from mtkd_jax.teachers.stacking import num_stacked
from mtkd_jax.weighting import get_weighting

__all__ = ["make_supervised_step", "make_distill_step", "make_codistill_step", "stacked_step"]

ApplyFn = Callable[..., jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def _keys(key: jax.Array, state: TrainState, augment: bool) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, model key) of this update, from `fold_in(key, state.step)`."""
    step_key = jax.random.fold_in(key, state.step)
    if not augment:
        return step_key, step_key
    aug_key, model_key = jax.random.split(step_key)
    return aug_key, model_key


def _forward(apply_fn: ApplyFn, params, x, key, pass_key: bool, b: int, name: str):
    """The one call of a trained model: logits `[B, C]`, checked."""
    logits = apply_fn(params, x, key) if pass_key else apply_fn(params, x)
    if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != b:
        raise ValueError(f"`{name}` must return logits [B, C] with B={b}, got {jnp.shape(logits)}.")
    _checks.check_float(logits, f"the logits of `{name}`")
    return logits


def _accuracy(logits, labels, label_mask, axis_name):
    correct = jnp.argmax(logits, axis=-1) == labels
    return global_mean(correct, label_mask, axis_name=axis_name)


def _check_config(*, soft_loss: str, temperature, alpha) -> None:
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    _checks.check_temperature(temperature)
    _checks.check_unit_interval(alpha, "alpha")


def _update(tx, state: TrainState, grads, axis_name, update=None):
    grads = pmean(grads, axis_name)
    updates, opt_state = (update or tx.update)(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


def make_supervised_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: AugmentFn | None = None,
    axis_name: str | None = None,
    pass_key: bool = False,
) -> Callable:
    """Build a supervised step: mean cross-entropy over the labeled examples, an optax update.

    How teachers are trained (one, or K at once with `stacked_step`) and the baseline of a
    student trained alone. Examples with `batch["label_mask"]` 0 are ignored.

    Args:
      apply_fn: `apply(params, x) -> [B, C]` (or `apply(params, x, key)`, `pass_key`).
      tx: optax optimizer.
      augment_fn: optional `augment_fn(key, x) -> x` applied to the batch with this update's
        key (e.g. `mtkd_jax.data.augment`).
      axis_name: None for a global-batch step; a mapped axis name for a per-device step.
      pass_key: call `apply_fn(params, x, key)` with this update's key (dropout).

    Returns:
      Un-jitted `step(state, batch, key) -> (state, {"loss", "accuracy"})`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.state import init_train_state
      >>> from mtkd_jax.steps import make_supervised_step
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
        x, labels, mask, b = batch_parts(batch)
        if labels is None:
            raise ValueError("A supervised step needs labels in batch['y'].")
        aug_key, model_key = _keys(key, state, augment_fn is not None)
        if augment_fn is not None:
            x = augment_fn(aug_key, x)

        def loss_fn(params):
            logits = _forward(apply_fn, params, x, model_key, pass_key, b, "apply_fn")
            return mean_cross_entropy(logits, labels, label_mask=mask, axis_name=axis_name), logits

        grads, logits = jax.grad(loss_fn, has_aux=True)(as_varying(state.params, axis_name))
        metrics = {
            "loss": mean_cross_entropy(logits, labels, label_mask=mask, axis_name=axis_name),
            "accuracy": _accuracy(logits, labels, mask, axis_name),
        }
        return _update(tx, state, grads, axis_name), pmean(metrics, axis_name)

    return step


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
      student_apply: `apply(params, x) -> [B, C]` (or `apply(params, x, key)`, `pass_key`).
      teacher_apply: `apply(teacher_params, x) -> [K, B, C]` (e.g.
        `mtkd_jax.teachers.make_stacked_apply`), or None to read `batch["teacher_logits"]`.
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
      pass_key: call `student_apply(params, x, key)` with this update's key (dropout).

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
    _check_config(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
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

    def step(state: TrainState, batch: dict, key: jax.Array, *, teacher_params=None):
        x, labels, mask, b = batch_parts(batch)
        aug_key, model_key = _keys(key, state, augment_fn is not None)
        if augment_fn is not None:
            x = augment_fn(aug_key, x)
        teacher_logits = teacher_logits_of(batch, x, teacher_apply, teacher_params)
        dt = distill_targets(
            teacher_logits, labels, label_mask=mask, temperature=temperature,
            weighting=weighting_fn,
        )
        targets = jax.lax.stop_gradient(dt.targets)

        def loss_fn(params):
            logits = _forward(student_apply, params, x, model_key, pass_key, b, "student_apply")
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
            return parts.loss, (logits, parts)

        grads, (logits, parts) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        k = dt.probs.shape[0]
        if k > 1:
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
            "teacher_logits_finite": jnp.all(jnp.isfinite(teacher_logits)).astype(jnp.float32),
        }
        if labels is not None:
            metrics["accuracy"] = _accuracy(logits, labels, mask, axis_name)
        return _update(tx, state, grads, axis_name), pmean(metrics, axis_name)

    return step


def _model_keys(key: jax.Array, k: int) -> jax.Array:
    """`[K]` keys, model k's being `fold_in(key, k)`."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k))


def stacked_step(step: Callable) -> Callable:
    """Run a one-model step on K stacked models at once (one vmapped program).

    Every model sees the same batch; model k gets the key `jax.random.fold_in(key, k)`, so
    its trajectory equals `step` run on its own slice of the state with that key (to float
    tolerance). Keyword arguments (e.g. `teacher_params`) are shared by all K models.

    Args:
      step: `step(state, batch, key, **kw) -> (state, metrics)` for one model, e.g. from
        `make_supervised_step` (K teachers from different seeds) or `make_distill_step`.

    Returns:
      Un-jitted `step(state, batch, key, **kw) -> (state, metrics)` for a `TrainState` whose
      params and opt_state leaves are `[K, ...]` (`init_stacked_train_state`); every metric
      gains a leading K axis.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.state import init_stacked_train_state
      >>> from mtkd_jax.steps import make_supervised_step, stacked_step
      >>> tx = optax.sgd(0.1)
      >>> params = jax.vmap(lambda k: jax.random.normal(k, (3, 2)))(
      ...     jax.random.split(jax.random.key(0), 4))
      >>> state = init_stacked_train_state(params, tx)
      >>> step = jax.jit(stacked_step(make_supervised_step(lambda w, x: x @ w, tx)))
      >>> batch = {"x": jnp.ones((5, 3)), "y": jnp.zeros(5, jnp.int32)}
      >>> state, metrics = step(state, batch, jax.random.key(1))
      >>> int(state.step), metrics["loss"].shape
      (1, (4,))
    """

    def run(state: TrainState, batch: dict, key: jax.Array, **kwargs):
        k = num_stacked(state.params, "state.params")

        def one(params, opt_state, model_key):
            new, metrics = step(TrainState(state.step, params, opt_state), batch, model_key,
                                **kwargs)
            return new.params, new.opt_state, metrics

        params, opt_state, metrics = jax.vmap(one)(
            state.params, state.opt_state, _model_keys(key, k)
        )
        return TrainState(state.step + 1, params, opt_state), metrics

    return run


def make_codistill_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    soft_loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    weighting: str | Callable | None = None,
    axis_name: str | None = None,
    pass_key: bool = False,
) -> Callable:
    r"""Build a codistillation step: K models of one architecture refine each other.

    The article's worked project (section 5): every model k moves toward the leave-one-out
    target of the others' **current** predictions,
    :math:`t_k = \sum_{j \ne k} w_j p_j / \sum_{j \ne k} w_j` with :math:`p_j` at temperature
    T (`mtkd_jax.leave_one_out_targets`), held fixed for the step, with the loss of
    `mean_distillation_loss`. All K forward passes, losses and optimizer updates run in one
    vmapped program; model k's gradient is that of its own loss only. With
    ``soft_loss="mse"`` and no weighting this is the article's objective.

    Args:
      apply_fn: `apply(params, x) -> [B, C]` for one model (or with a key, `pass_key`).
      tx: optax optimizer, one state per model (`init_stacked_train_state`).
      soft_loss: ``"kl"`` or ``"mse"``.
      temperature: T > 0.
      alpha: hard-label weight in [0, 1] (labels in `batch["y"]`, masked by `label_mask`).
      weighting: None for the plain mean of the others (the article's); or a weighting name or
        function (`mtkd_jax.weighting`, e.g. `get_weighting("static", lambdas=w)`) applied
        to the models' current predictions.
      axis_name: as in `make_distill_step`.
      pass_key: call `apply_fn(params, x, key)`, model k with its own key.

    Returns:
      Un-jitted `step(state, batch, key) -> (state, metrics)` for a stacked `TrainState`.
      Metrics: ``loss`` (mean over models), ``model_loss``, ``soft_loss``, ``hard_loss``,
      ``accuracy`` (each `[K]`, accuracy only with labels), ``divergence`` `[K, K]`
      (squared, batch mean).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.state import init_stacked_train_state
      >>> from mtkd_jax.steps import make_codistill_step
      >>> tx = optax.sgd(0.5)
      >>> step = jax.jit(make_codistill_step(lambda p, x: x @ p, tx, soft_loss="mse"))
      >>> state = init_stacked_train_state(jnp.stack([jnp.eye(2), -jnp.eye(2)]), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.arange(2)}
      >>> for _ in range(20):
      ...     state, m = step(state, batch, jax.random.key(0))
      >>> bool(m["divergence"][0, 1] < 0.01)                      # the two models converged
      True
    """
    _check_config(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
    weighting_fn = None if weighting is None else get_weighting(weighting)

    def step(state: TrainState, batch: dict, key: jax.Array):
        x, labels, mask, b = batch_parts(batch)
        k = num_stacked(state.params, "state.params")
        if k < 2:
            raise ValueError(f"Codistillation needs K >= 2 stacked models, got K={k}.")
        keys = jax.vmap(lambda kk: jax.random.fold_in(kk, state.step))(_model_keys(key, k))

        def loss_fn(params):
            logits = jax.vmap(
                lambda p, kk: _forward(apply_fn, p, x, kk, pass_key, b, "apply_fn")
            )(params, keys)  # [K, B, C]
            frozen = jax.lax.stop_gradient(logits)
            if weighting_fn is None:
                probs, w = softmax_t(frozen, temperature=temperature), None
            else:
                dt = distill_targets(frozen, labels, label_mask=mask, temperature=temperature,
                                     weighting=weighting_fn)
                probs, w = dt.probs, dt.weights
            targets = leave_one_out_targets(probs, w)  # [K, B, C]
            parts = jax.vmap(
                lambda s, t: mean_distillation_loss(
                    s, t, labels, alpha=alpha, temperature=temperature, soft_loss=soft_loss,
                    label_mask=mask, axis_name=axis_name,
                )
            )(logits, targets)  # each [K]
            # Targets are constants, so model k's gradient of the sum is that of its own loss.
            return jnp.sum(parts.loss), (logits, probs, parts)

        grads, (logits, probs, parts) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        metrics = {
            "loss": jnp.mean(parts.loss),
            "model_loss": parts.loss,
            "soft_loss": parts.soft,
            "hard_loss": parts.hard,
            "divergence": global_mean(pairwise_divergence(probs), axis_name=axis_name),
        }
        if labels is not None:
            metrics["accuracy"] = jax.vmap(lambda s: _accuracy(s, labels, mask, axis_name))(
                logits
            )
        return _update(tx, state, grads, axis_name, jax.vmap(tx.update)), pmean(
            metrics, axis_name
        )

    return step
