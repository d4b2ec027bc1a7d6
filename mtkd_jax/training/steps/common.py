"""What every step factory shares: the key of an update, the model call, the update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.argmax import is_argmax
from mtkd_jax.core.losses import soft_loss_fn
from mtkd_jax.core.reduce import global_mean, pmean
from mtkd_jax.models.adapt import as_model
from mtkd_jax.models.protocol import Model
from mtkd_jax.training.batch import check_batch
from mtkd_jax.training.state import TrainState

__all__ = ["ApplyFn", "AugmentFn", "update_keys", "device_key", "forward", "accuracy",
           "check_config", "apply_update", "model_keys", "trained_model", "sync_model_state",
           "check_concrete_batch", "labels_in_range"]

ApplyFn = Callable[..., jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def update_keys(
    key: jax.Array, state: TrainState, augment: bool, axis_name=None
) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, model key) of this update, from `fold_in(key, state.step)`.

    In a per-device step (`axis_name` set: `shard_map`, `pmap`) each device's keys are
    further folded with its index on the axis (`device_key`), so devices draw different
    Dropout masks and augmentations for their different rows.
    """
    step_key = device_key(jax.random.fold_in(key, state.step), axis_name)
    if not augment:
        return step_key, step_key
    aug_key, model_key = jax.random.split(step_key)
    return aug_key, model_key


def device_key(key: jax.Array, axis_name) -> jax.Array:
    """`fold_in(key, axis_index(axis_name))`: this device's key in a per-device step; `key`
    itself for a global-batch step (`axis_name=None`).

    A model draws its Dropout masks for the rows it is given. In a global-batch step
    (`data_parallel_step(mode="jit")`) that is the whole batch and XLA's partitioned PRNG
    gives each device its slice of the one-device masks, so the run does not depend on the
    device count. A per-device step sees only its rows: with one shared key every device
    would draw the same masks for different examples. Folding in the device index gives each
    device its own masks; they are not slices of the one-device masks (a model's draw for
    its local rows cannot be offset into a global draw), so a per-device run equals the
    one-device run in distribution, not bit for bit.
    """
    if axis_name is None:
        return key
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


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


def check_concrete_batch(batch: dict, num_classes: int) -> None:
    """`check_batch(batch, num_classes=C)` on the host when the batch's values are concrete
    (a step called eagerly: C from its logits); nothing under a trace, where the loops'
    host checks and the ``labels_in_range`` metric stand in."""
    if not any(_checks.is_traced(v) for v in jax.tree.leaves(batch)):
        check_batch(batch, num_classes=num_classes)


def labels_in_range(labels, hard_mask, num_classes: int) -> jax.Array:
    """1.0 when every counted label (`hard_mask` > 0, all when None) is in `[0, C)`, else 0.0:
    a step metric, so that a loop without `num_classes` can name out-of-range labels (they
    give a NaN or a wrong loss inside the compiled step)."""
    ok = (labels >= 0) & (labels < num_classes)
    if hard_mask is not None:
        ok = ok | (jnp.asarray(hard_mask) <= 0)
    return jnp.all(ok).astype(jnp.float32)


def accuracy(logits, labels, label_mask, axis_name):
    correct = is_argmax(logits, labels)
    return global_mean(correct, label_mask, axis_name=axis_name)


def check_config(*, soft_loss: str, temperature, alpha) -> Callable:
    """Check a step's loss hyperparameters once, when it is built; return the soft loss
    function (`soft_loss_fn`), which the step passes on resolved."""
    soft_fn = soft_loss_fn(soft_loss)
    _checks.check_temperature(temperature)
    _checks.check_unit_interval(alpha, "alpha")
    return soft_fn


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
