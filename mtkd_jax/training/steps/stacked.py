r"""K models of one architecture at once: `stacked_step` (each alone, vmapped) and
codistillation (the K models refine each other)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mtkd_jax.core.divergence import pairwise_divergence, softmax_t
from mtkd_jax.core.losses import mean_distillation_loss
from mtkd_jax.core.reduce import as_varying, global_mean, pmean
from mtkd_jax.models.stacking import num_stacked
from mtkd_jax.objective.targets import distill_targets, leave_one_out_targets
from mtkd_jax.training.batch import batch_parts
from mtkd_jax.training.state import TrainState
from mtkd_jax.training.steps.common import (
    ApplyFn,
    accuracy,
    apply_update,
    check_config,
    forward,
    model_keys,
    trained_model,
)
from mtkd_jax.weighting import get_weighting

__all__ = ["stacked_step", "make_codistill_step"]


def stacked_step(step: Callable, *, per_model: tuple[str, ...] = ()) -> Callable:
    """Run a one-model step on K stacked models at once (one vmapped program).

    Every model sees the same batch; model k gets the key `jax.random.fold_in(key, k)`, so
    its trajectory equals `step` run on its own slice of the state with that key (to float
    tolerance). Keyword arguments (e.g. `teacher_params`) are shared by all K models.

    Args:
      step: `step(state, batch, key, **kw) -> (state, metrics)` for one model, e.g. from
        `make_supervised_step` (K teachers from different seeds) or `make_distill_step`.
      per_model: batch entries with a leading K axis, model k getting entry `[k]` (e.g.
        ``("teacher_logits",)`` `[K, B, C]` for a step that takes each model's own target
        logits `[B, C]`); every other entry is shared.

    Returns:
      Un-jitted `step(state, batch, key, **kw) -> (state, metrics)` for a `TrainState` whose
      params and opt_state leaves are `[K, ...]` (`init_stacked_train_state`); every metric
      gains a leading K axis.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_stacked_train_state
      >>> from mtkd_jax.training.steps import make_supervised_step, stacked_step
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

        own = {name: batch[name] for name in per_model}
        shared = {name: v for name, v in batch.items() if name not in own}

        def one(params, opt_state, model_state, model_key, own_entries):
            one_state = TrainState(state.step, params, opt_state, model_state)
            new, metrics = step(one_state, {**shared, **own_entries}, model_key, **kwargs)
            return new.params, new.opt_state, new.model_state, metrics

        params, opt_state, model_state, metrics = jax.vmap(one)(
            state.params, state.opt_state, state.model_state, model_keys(key, k), own
        )
        return TrainState(state.step + 1, params, opt_state, model_state), metrics

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
      apply_fn: one model: a `mtkd_jax.models.Model`, a Linen or NNX module, or a plain
        `apply(params, x) -> [B, C]` (or with a key, `pass_key`); model k's state is
        `state.model_state[k]`.
      tx: optax optimizer, one state per model (`init_stacked_train_state`).
      soft_loss: ``"kl"`` or ``"mse"``.
      temperature: T > 0.
      alpha: hard-label weight in [0, 1] (labels in `batch["y"]`, masked by `label_mask`).
      weighting: None for the plain mean of the others (the article's); or a weighting name or
        function (`mtkd_jax.weighting`, e.g. `get_weighting("static", lambdas=w)`) applied
        to the models' current predictions.
      axis_name: as in `make_distill_step`.
      pass_key: for a plain function: call `apply_fn(params, x, key)`, model k with its
        own key.

    Returns:
      Un-jitted `step(state, batch, key) -> (state, metrics)` for a stacked `TrainState`.
      Metrics: ``loss`` (mean over models), ``model_loss``, ``soft_loss``, ``hard_loss``,
      ``accuracy`` (each `[K]`, accuracy only with labels), ``divergence`` `[K, K]`
      (squared, batch mean).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_stacked_train_state
      >>> from mtkd_jax.training.steps import make_codistill_step
      >>> tx = optax.sgd(0.5)
      >>> step = jax.jit(make_codistill_step(lambda p, x: x @ p, tx, soft_loss="mse"))
      >>> state = init_stacked_train_state(jnp.stack([jnp.eye(2), -jnp.eye(2)]), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.arange(2)}
      >>> for _ in range(20):
      ...     state, m = step(state, batch, jax.random.key(0))
      >>> bool(m["divergence"][0, 1] < 0.01)                      # the two models converged
      True
    """
    check_config(soft_loss=soft_loss, temperature=temperature, alpha=alpha)
    weighting_fn = None if weighting is None else get_weighting(weighting)
    model = trained_model(apply_fn, pass_key)

    def step(state: TrainState, batch: dict, key: jax.Array):
        bp = batch_parts(batch)
        x, labels, mask, b, token_mask = bp
        hard_mask = bp.hard_mask
        k = num_stacked(state.params, "state.params")
        if k < 2:
            raise ValueError(f"Codistillation needs K >= 2 stacked models, got K={k}.")
        keys = jax.vmap(lambda kk: jax.random.fold_in(kk, state.step))(model_keys(key, k))

        def loss_fn(params):
            logits, model_state = jax.vmap(
                lambda p, s, kk: forward(model, p, s, x, kk, b, "apply_fn", lead=bp.lead)
            )(params, state.model_state, keys)  # [K, B, C] ([K, B, L, V])
            frozen = jax.lax.stop_gradient(logits)
            if weighting_fn is None:
                probs, w = softmax_t(frozen, temperature=temperature), None
            else:
                dt = distill_targets(frozen, labels, label_mask=hard_mask,
                                     temperature=temperature, weighting=weighting_fn)
                probs, w = dt.probs, dt.weights
            targets = leave_one_out_targets(probs, w)  # [K, B, C]
            parts = jax.vmap(
                lambda s, t: mean_distillation_loss(
                    s, t, labels, alpha=alpha, temperature=temperature, soft_loss=soft_loss,
                    label_mask=mask, mask=token_mask, axis_name=axis_name,
                )
            )(logits, targets)  # each [K]
            # Targets are constants, so model k's gradient of the sum is that of its own loss.
            return jnp.sum(parts.loss), (logits, probs, parts, model_state)

        grads, (logits, probs, parts, model_state) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        metrics = {
            "loss": jnp.mean(parts.loss),
            "model_loss": parts.loss,
            "soft_loss": parts.soft,
            "hard_loss": parts.hard,
            "divergence": global_mean(pairwise_divergence(probs), token_mask,
                                      axis_name=axis_name),
        }
        if labels is not None:
            metrics["accuracy"] = jax.vmap(lambda s: accuracy(s, labels, hard_mask, axis_name))(
                logits
            )
        new_state = apply_update(tx, state, grads, axis_name, model_state, jax.vmap(tx.update))
        return new_state, pmean(metrics, axis_name)

    return step
