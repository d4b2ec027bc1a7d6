"""Training teachers: K same-architecture teachers at once, or one after another.

`init_ensemble` and `make_ensemble_train_step` train K same-architecture teachers as one
vmapped program (different seeds, and optionally different hyperparameters through
`optax.inject_hyperparams`); heterogeneous teachers train one after another with
`make_teacher_train_step`.

Moved unchanged from the former `mtkd_jax/teachers.py`; to be replaced by the one train
state (`mtkd_jax.state`) and the supervised step (`mtkd_jax.steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtkd_jax.losses import cross_entropy

__all__ = [
    "TeacherState",
    "init_teacher_state",
    "init_ensemble",
    "set_hyperparams",
    "make_teacher_train_step",
    "make_ensemble_train_step",
]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


class TeacherState(NamedTuple):
    """Train state of one teacher, or of K stacked teachers (every leaf with a K axis).

    Same fields as `mtkd_jax.train.TrainState`, so the two are interchangeable.

    Attributes:
      step: int32 scalar (`[K]` when stacked), number of updates done.
      params: the model's params pytree.
      opt_state: the optax state of `params`.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def init_teacher_state(params: Any, tx: optax.GradientTransformation) -> TeacherState:
    """A single teacher's `TeacherState` at step 0.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_teacher_state
      >>> int(init_teacher_state({"w": jnp.zeros(3)}, optax.sgd(0.1)).step)
      0
    """
    return TeacherState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_ensemble(
    model_init_fn: Callable[[jax.Array], Any],
    keys: jax.Array,
    tx: optax.GradientTransformation,
    *,
    hyperparams: Mapping[str, Any] | None = None,
) -> TeacherState:
    """Stacked `TeacherState` of K teachers of one architecture, one init per key.

    With the default threefry keys, teacher k's params equal `model_init_fn(keys[k])`.

    Args:
      model_init_fn: `key -> params`, e.g.
        `functools.partial(mtkd_jax.models.init_params, model, example_x=x)`.
      keys: `[K]` PRNG keys (e.g. `jax.random.split(key, K)`).
      tx: the optimizer, shared by all teachers.
      hyperparams: optional per-teacher values `[K]` (or scalars) of hyperparameters that
        `tx` injects with `optax.inject_hyperparams`, e.g. `{"learning_rate": lrs}`.

    Returns:
      `TeacherState` with step `[K]` and params / opt_state leaves `[K, ...]`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_ensemble
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> init = lambda key: {"w": jax.random.normal(key, (4, 2))}
      >>> state = init_ensemble(init, jax.random.split(jax.random.key(0), 3), tx,
      ...                       hyperparams={"learning_rate": jnp.array([0.5, 0.25, 0.125])})
      >>> state.params["w"].shape, state.opt_state.hyperparams["learning_rate"].tolist()
      ((3, 4, 2), [0.5, 0.25, 0.125])
    """
    if jnp.ndim(keys) == 0 or (
        not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) and jnp.ndim(keys) != 2
    ):
        raise ValueError(
            f"`keys` must be a batch of K PRNG keys [K] (e.g. jax.random.split(key, K)), "
            f"got shape {jnp.shape(keys)}."
        )
    k = keys.shape[0]
    params = jax.jit(jax.vmap(model_init_fn))(keys)
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    state = TeacherState(jnp.zeros((k,), jnp.int32), params, opt_state)
    if hyperparams:
        state = set_hyperparams(state, hyperparams)
    return state


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def set_hyperparams(state: TeacherState, values: Mapping[str, Any]) -> TeacherState:
    """Set hyperparameters injected by `optax.inject_hyperparams` in a (stacked) state.

    Args:
      state: a `TeacherState` whose optimizer was wrapped by `optax.inject_hyperparams`.
      values: name -> value broadcastable to the stored hyperparameter (`[K]` per teacher for
        a stacked state, a scalar for a single one).

    Returns:
      The state with those hyperparameters replaced (same shapes and dtypes).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_teacher_state, set_hyperparams
      >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
      >>> state = set_hyperparams(init_teacher_state({"w": jnp.zeros(2)}, tx),
      ...                         {"learning_rate": 0.5})
      >>> float(state.opt_state.hyperparams["learning_rate"])
      0.5
    """
    found: set[str] = set()
    any_injected = False

    def replace(node):
        nonlocal any_injected
        if not isinstance(node, _INJECT_STATES):
            return node
        any_injected = True
        hp = dict(node.hyperparams)
        for name, value in values.items():
            if name in hp:
                old = hp[name]
                value = np.asarray(value)
                try:
                    hp[name] = jnp.asarray(np.broadcast_to(value, jnp.shape(old)), old.dtype)
                except ValueError:
                    raise ValueError(
                        f"`values[{name!r}]` has shape {value.shape}, not broadcastable to the "
                        f"stored hyperparameter's shape {jnp.shape(old)} ([K] per teacher)."
                    ) from None
                found.add(name)
        return node._replace(hyperparams=hp)

    opt_state = jax.tree.map(
        replace, state.opt_state, is_leaf=lambda n: isinstance(n, _INJECT_STATES)
    )
    if not any_injected:
        raise ValueError(
            "`state.opt_state` has no injected hyperparameters: build the optimizer with "
            "`optax.inject_hyperparams(optax.sgd)(learning_rate=...)` (or similar)."
        )
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(f"`values` names {missing}, which the optimizer does not inject.")
    return state._replace(opt_state=opt_state)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _single_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None,
):
    def step(state: TeacherState, batch: Mapping[str, jax.Array], key: jax.Array):
        x, y = batch["x"], batch["y"]
        mask = batch.get("label_mask")
        if augment_fn is not None:
            x = augment_fn(x, jax.random.fold_in(key, state.step))

        def loss_fn(params):
            logits = apply_fn(params, x)
            loss = _masked_mean(cross_entropy(logits, y), mask)
            correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
            return loss, _masked_mean(correct, mask)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TeacherState(state.step + 1, params, opt_state)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return step


def make_teacher_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[..., tuple[TeacherState, dict[str, jax.Array]]]:
    """A jitted supervised step for one teacher: cross-entropy on the labels, an optax update.

    Heterogeneous teachers train one after another, each with its own step.

    Args:
      apply_fn: `(params, x) -> logits [B, C]`.
      tx: the optimizer.
      augment_fn: optional `(x, key) -> x` applied to the batch with the per-step key
        `jax.random.fold_in(key, state.step)`; without it the key is unused.

    Returns:
      `step(state, batch, key) -> (state, {"loss": [], "accuracy": []})`; batch holds
      `"x"` `[B, ...]`, `"y"` `[B]` int and optionally `"label_mask"` `[B]` (unlabeled
      examples, mask 0, are left out of the loss and accuracy).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_teacher_state, make_teacher_train_step
      >>> tx = optax.sgd(0.5)
      >>> step = make_teacher_train_step(lambda w, x: x @ w, tx)
      >>> state = init_teacher_state(jnp.zeros((2, 2)), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([0, 1])}
      >>> for _ in range(3):
      ...     state, metrics = step(state, batch, jax.random.key(0))
      >>> int(state.step), float(metrics["accuracy"])
      (3, 1.0)
    """
    return jax.jit(_single_step(apply_fn, tx, augment_fn))


def make_ensemble_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[..., tuple[TeacherState, dict[str, jax.Array]]]:
    """One jitted step that trains K stacked teachers at once (`jax.vmap` over K).

    Every teacher sees the same batch; teacher k gets the key `jax.random.fold_in(key, k)`,
    so its trajectory equals `make_teacher_train_step(apply_fn, tx)` run on its own slice of
    the state with that key (to float tolerance).

    Args:
      apply_fn: `(params, x) -> logits [B, C]` of one teacher.
      tx: the optimizer (per-teacher hyperparameters via `optax.inject_hyperparams` and
        `init_ensemble(..., hyperparams=...)`).
      augment_fn: optional `(x, key) -> x`, applied per teacher (each gets its own views).

    Returns:
      `step(stacked_state, batch, key) -> (stacked_state, {"loss": [K], "accuracy": [K]})`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_ensemble, make_ensemble_train_step
      >>> tx = optax.sgd(0.1)
      >>> init = lambda key: jax.random.normal(key, (3, 2))
      >>> state = init_ensemble(init, jax.random.split(jax.random.key(0), 4), tx)
      >>> step = make_ensemble_train_step(lambda w, x: x @ w, tx)
      >>> batch = {"x": jnp.ones((5, 3)), "y": jnp.zeros(5, jnp.int32)}
      >>> state, metrics = step(state, batch, jax.random.key(1))
      >>> state.step.tolist(), metrics["loss"].shape
      ([1, 1, 1, 1], (4,))
    """
    single = _single_step(apply_fn, tx, augment_fn)

    def step(state: TeacherState, batch: Mapping[str, jax.Array], key: jax.Array):
        if jnp.ndim(state.step) != 1:
            raise ValueError(
                f"`state` must be a stacked TeacherState (step of shape [K]), got step shape "
                f"{jnp.shape(state.step)}; use `init_ensemble`."
            )
        k = state.step.shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k))
        return jax.vmap(single, in_axes=(0, None, 0))(state, batch, keys)

    return jax.jit(step)
