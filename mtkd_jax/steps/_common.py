"""What every step factory shares: the key of an update, the model call, the update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mtkd_jax import _checks
from mtkd_jax.losses import SOFT_LOSSES
from mtkd_jax.reduce import global_mean, pmean
from mtkd_jax.state import TrainState

__all__ = ["ApplyFn", "AugmentFn", "update_keys", "forward", "accuracy", "check_config",
           "apply_update", "model_keys"]

ApplyFn = Callable[..., jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def update_keys(key: jax.Array, state: TrainState, augment: bool) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, model key) of this update, from `fold_in(key, state.step)`."""
    step_key = jax.random.fold_in(key, state.step)
    if not augment:
        return step_key, step_key
    aug_key, model_key = jax.random.split(step_key)
    return aug_key, model_key


def forward(apply_fn: ApplyFn, params, x, key, pass_key: bool, b: int, name: str):
    """The one call of a trained model: logits `[B, C]`, checked."""
    logits = apply_fn(params, x, key) if pass_key else apply_fn(params, x)
    if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != b:
        raise ValueError(f"`{name}` must return logits [B, C] with B={b}, got {jnp.shape(logits)}.")
    _checks.check_float(logits, f"the logits of `{name}`")
    return logits


def accuracy(logits, labels, label_mask, axis_name):
    correct = jnp.argmax(logits, axis=-1) == labels
    return global_mean(correct, label_mask, axis_name=axis_name)


def check_config(*, soft_loss: str, temperature, alpha) -> None:
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    _checks.check_temperature(temperature)
    _checks.check_unit_interval(alpha, "alpha")


def apply_update(tx, state: TrainState, grads, axis_name, update=None):
    grads = pmean(grads, axis_name)
    updates, opt_state = (update or tx.update)(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


def model_keys(key: jax.Array, k: int) -> jax.Array:
    """`[K]` keys, model k's being `fold_in(key, k)`."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k))
