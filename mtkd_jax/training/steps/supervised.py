"""The supervised step: mean cross-entropy over the labeled examples, an optax update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from mtkd_jax.core.losses import mean_cross_entropy
from mtkd_jax.core.reduce import as_varying, pmean
from mtkd_jax.training.batch import batch_parts
from mtkd_jax.training.state import TrainState
from mtkd_jax.training.steps.common import (
    ApplyFn,
    AugmentFn,
    accuracy,
    apply_update,
    forward,
    trained_model,
    update_keys,
)

__all__ = ["make_supervised_step"]


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
    student trained alone. Examples with `batch["label_mask"]` 0 are ignored. A sequence
    batch (`batch["y"]` `[B, L]`, `batch["mask"]` `[B, L]`, logits `[B, L, V]`) is trained
    on the mean token CE over the valid tokens of the global batch.

    Args:
      apply_fn: the model: a `mtkd_jax.models.Model` (Dropout keys from this update's key,
        model state such as BatchNorm statistics updated in `state.model_state`), a Flax
        Linen or NNX module, or a plain `apply(params, x) -> [B, C]` (or `apply(params, x,
        key)`, `pass_key`).
      tx: optax optimizer.
      augment_fn: optional `augment_fn(key, x) -> x` applied to the batch with this update's
        key (e.g. `mtkd_jax.data.augment`).
      axis_name: None for a global-batch step; a mapped axis name for a per-device step.
      pass_key: for a plain function: call `apply_fn(params, x, key)` with this update's key.

    Returns:
      Un-jitted `step(state, batch, key) -> (state, {"loss", "accuracy"})`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_train_state
      >>> from mtkd_jax.training.steps import make_supervised_step
      >>> tx = optax.sgd(1.0)
      >>> step = jax.jit(make_supervised_step(lambda p, x: x @ p, tx))
      >>> state = init_train_state(jnp.zeros((2, 2)), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([1, 0])}
      >>> state, m0 = step(state, batch, jax.random.key(0))
      >>> state, m1 = step(state, batch, jax.random.key(0))
      >>> bool(m1["loss"] < m0["loss"]), float(m1["accuracy"])
      (True, 1.0)
    """
    model = trained_model(apply_fn, pass_key)

    def step(state: TrainState, batch: dict, key: jax.Array):
        parts = batch_parts(batch)
        x, labels, mask, b, token_mask = parts
        if labels is None:
            raise ValueError("A supervised step needs labels in batch['y'].")
        aug_key, model_key = update_keys(key, state, augment_fn is not None)
        if augment_fn is not None:
            x = augment_fn(aug_key, x)

        def loss_fn(params):
            logits, model_state = forward(
                model, params, state.model_state, x, model_key, b, "apply_fn", lead=parts.lead
            )
            loss = mean_cross_entropy(logits, labels, label_mask=mask, mask=token_mask,
                                      axis_name=axis_name)
            return loss, (logits, model_state)

        grads, (logits, model_state) = jax.grad(loss_fn, has_aux=True)(
            as_varying(state.params, axis_name)
        )
        metrics = {
            "loss": mean_cross_entropy(logits, labels, label_mask=mask, mask=token_mask,
                                       axis_name=axis_name),
            "accuracy": accuracy(logits, labels, parts.hard_mask, axis_name),
        }
        return apply_update(tx, state, grads, axis_name, model_state), pmean(metrics, axis_name)

    return step
