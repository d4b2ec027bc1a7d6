"""What every step factory shares: the key of an update, the model call, the update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.losses import SOFT_LOSSES
from mtkd_jax.core.reduce import global_mean, pmean
from mtkd_jax.models.adapt import as_model
from mtkd_jax.models.protocol import Model
from mtkd_jax.training.state import TrainState

__all__ = ["ApplyFn", "AugmentFn", "update_keys", "forward", "accuracy", "check_config",
           "apply_update", "model_keys", "trained_model", "sync_model_state"]

ApplyFn = Callable[..., jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def update_keys(key: jax.Array, state: TrainState, augment: bool) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, model key) of this update, from `fold_in(key, state.step)`."""
    step_key = jax.random.fold_in(key, state.step)
    if not augment:
        return step_key, step_key
    aug_key, model_key = jax.random.split(step_key)
    return aug_key, model_key


def trained_model(model, pass_key: bool) -> Model:
    """The `Model` a step trains: a Model, a Linen or NNX module, or a plain apply function."""
    return as_model(model, pass_key=pass_key)


def forward(model: Model, params, model_state, x, key, b: int, name: str, lead=None):
    """The one call of a trained model, in training mode: `(logits [B, C], model_state)`
    (`[B, L, V]` for a sequence batch, `lead` = `(B, L)`)."""
    logits, new_state = model.apply(params, model_state, x, train=True, key=key)
    want = (b,) if lead is None else tuple(lead)
    if jnp.ndim(logits) != len(want) + 1 or tuple(jnp.shape(logits)[:-1]) != want:
        if len(want) == 1:
            raise ValueError(
                f"`{name}` must return logits [B, C] with B={b}, got {jnp.shape(logits)}."
            )
        raise ValueError(
            f"`{name}` must return logits [B, L, V] (features [B, L, H] with a head) with "
            f"[B, L]={want}, got {jnp.shape(logits)}."
        )
    _checks.check_float(logits, f"the logits of `{name}`")
    return logits, new_state


def sync_model_state(model_state, axis_name):
    """Average the floating model state (batch statistics) over `axis_name`: every device
    keeps the same state (a no-op when the model already synchronises its statistics)."""
    if axis_name is None:
        return model_state
    return jax.tree.map(
        lambda v: jax.lax.pmean(v, axis_name) if jnp.issubdtype(v.dtype, jnp.inexact) else v,
        model_state,
    )


def accuracy(logits, labels, label_mask, axis_name):
    correct = jnp.argmax(logits, axis=-1) == labels
    return global_mean(correct, label_mask, axis_name=axis_name)


def check_config(*, soft_loss: str, temperature, alpha) -> None:
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    _checks.check_temperature(temperature)
    _checks.check_unit_interval(alpha, "alpha")


def apply_update(tx, state: TrainState, grads, axis_name, model_state, update=None):
    grads = pmean(grads, axis_name)
    updates, opt_state = (update or tx.update)(grads, state.opt_state, state.params)
    return TrainState(
        state.step + 1,
        optax.apply_updates(state.params, updates),
        opt_state,
        sync_model_state(model_state, axis_name),
    )


def model_keys(key: jax.Array, k: int) -> jax.Array:
    """`[K]` keys, model k's being `fold_in(key, k)`."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k))
