"""The one train state, for students and teachers, one model or K stacked ones.

`TrainState(step, params, opt_state, model_state)` is data only: the optimizer and the
models live in the step's closure (`mtkd_jax.training.steps`). `model_state` is the model's
state that is not a parameter (BatchNorm statistics of a `mtkd_jax.models.Model`; None for a plain
apply function): the steps update it, `mtkd_jax.training.fit.fit` checkpoints and restores it with
the rest, and only `params` are differentiated. K models of one architecture trained at once
(teachers from different seeds, codistillation) share one scalar `step`; every leaf of their
`params`, `opt_state` and `model_state` has a leading K axis. `variables_of(state)` is what
a Model's frozen inference reads (`Model.eval_apply`): a teacher's or evaluated student's
`{"params", "model_state"}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtkd_jax.models.protocol import model_variables
from mtkd_jax.models.stacking import num_stacked

__all__ = [
    "TrainState",
    "init_train_state",
    "init_stacked_train_state",
    "set_hyperparams",
    "variables_of",
]


class TrainState(NamedTuple):
    """Data only.

    Attributes:
      step: int32 scalar array, the number of updates done.
      params: the model's params pytree (leaves `[K, ...]` for K stacked models).
      opt_state: the optax state of `params` (one per model when stacked).
      model_state: the model's non-parameter state (e.g. BatchNorm statistics), not
        differentiated; None for a stateless model.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = None


def init_train_state(params, tx: optax.GradientTransformation, *, model_state=None) -> TrainState:
    """A fresh `TrainState` at step 0 with `tx.init(params)`.

    Args:
      params: the params pytree (what the optimizer updates).
      tx: the optimizer.
      model_state: the model's non-parameter state (`Model.init`, `nnx_split`), or None.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_train_state
      >>> s = init_train_state({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> int(s.step), s.step.dtype, s.model_state
      (0, dtype('int32'), None)
    """
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state)


def variables_of(state: TrainState) -> dict[str, Any]:
    """`{"params": state.params, "model_state": state.model_state}`, a Model's variables.

    What `Model.eval_apply` reads: the `teacher_params` of Model teachers (a stacked state
    gives stacked variables) and the `params` of `evaluate` for a Model student.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_train_state, variables_of
      >>> sorted(variables_of(init_train_state({"w": jnp.zeros(3)}, optax.sgd(0.1))))
      ['model_state', 'params']
    """
    return model_variables(state.params, state.model_state)


def init_stacked_train_state(
    stacked_params,
    tx: optax.GradientTransformation,
    *,
    model_state=None,
    hyperparams: Mapping[str, Any] | None = None,
) -> TrainState:
    """`TrainState` of K models stacked on a leading axis: one optimizer state per model.

    Args:
      stacked_params: pytree whose leaves are `[K, ...]`, e.g.
        `jax.vmap(lambda k: mtkd_jax.init_params(model, k, x))(jax.random.split(key, K))`.
      tx: the optimizer, initialised once per model with `jax.vmap(tx.init)`.
      model_state: the K models' non-parameter states, stacked (leaves `[K, ...]`), or None.
      hyperparams: optional per-model values `[K]` (or scalars) of hyperparameters that `tx`
        injects with `optax.inject_hyperparams`, e.g. `{"learning_rate": lrs}` (different
        optimizers for different teachers), see `set_hyperparams`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_stacked_train_state
      >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
      >>> s = init_stacked_train_state({"w": jnp.zeros((2, 3))}, tx,
      ...                              hyperparams={"learning_rate": jnp.array([0.1, 0.2])})
      >>> s.opt_state.inner_state[0].mu["w"].shape, s.opt_state.hyperparams["learning_rate"]
      ((2, 3), Array([0.1, 0.2], dtype=float32))
    """
    k = num_stacked(stacked_params, "stacked_params")
    if model_state is not None and jax.tree.leaves(model_state):
        k_state = num_stacked(model_state, "model_state")
        if k_state != k:
            raise ValueError(
                f"`model_state` stacks {k_state} models but `stacked_params` {k}; stack both "
                "over the same K models."
            )
    state = TrainState(
        jnp.zeros((), jnp.int32),
        stacked_params,
        jax.jit(jax.vmap(tx.init))(stacked_params),
        model_state,
    )
    return set_hyperparams(state, hyperparams) if hyperparams else state


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def set_hyperparams(state: TrainState, values: Mapping[str, Any]) -> TrainState:
    """Set hyperparameters injected by `optax.inject_hyperparams` in a (stacked) state.

    Args:
      state: a `TrainState` whose optimizer was wrapped by `optax.inject_hyperparams`.
      values: name -> value broadcastable to the stored hyperparameter (`[K]` per model for
        a stacked state, a scalar for a single one).

    Returns:
      The state with those hyperparameters replaced (same shapes and dtypes).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.training.state import init_train_state, set_hyperparams
      >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
      >>> state = set_hyperparams(init_train_state({"w": jnp.zeros(2)}, tx),
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
                        f"stored hyperparameter's shape {jnp.shape(old)} ([K] per model)."
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
