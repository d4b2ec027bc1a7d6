"""Flax Linen modules as `mtkd_jax.models.Model`s: `linen_model`."""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax

from mtkd_jax.core.precision import Policy, get_policy
from mtkd_jax.models.protocol import Model, model_variables

__all__ = ["linen_model", "linen_variables"]


_TRAIN_ARGS = {"train": False, "training": False, "is_training": False, "deterministic": True}
"""Mode arguments `linen_model` recognises: name -> whether the value is `not train`."""


def _mode_arg(module: nn.Module, train_arg: str | None) -> tuple[str | None, bool]:
    if train_arg != "auto":
        return train_arg, False
    params = inspect.signature(type(module).__call__).parameters
    for name, inverted in _TRAIN_ARGS.items():
        if name in params:
            return name, inverted
    return None, False


def linen_model(
    module: nn.Module,
    *,
    train_arg: str | None = "auto",
    rng_streams: tuple[str, ...] = ("dropout",),
    policy: str | Policy | None = None,
) -> Model:
    """A Flax Linen module as a `Model`: mutable collections and dropout keys handled.

    In training, every collection of `model_state` (e.g. ``batch_stats``) is mutable and
    comes back updated, and `rngs` get the step's key (the first stream `key` itself, stream
    i > 0 `fold_in(key, i)`); in evaluation nothing is mutable and no key is passed.

    Args:
      module: an unbound Linen module.
      train_arg: the `__call__` argument that sets the mode: ``"auto"`` finds ``train``,
        ``training``, ``is_training`` (set to `train`) or ``deterministic`` (set to
        `not train`) in its signature; a name (set to `train`); or None (none passed).
      rng_streams: the RNG collections the module draws from in training.
      policy: a mixed-precision policy (`mtkd_jax.core.precision`), or None.

    Returns:
      A `Model` with `init(key, example_x) -> (params, model_state)`, `model_state` the
      dict of the other collections (`{}` for a stateless module).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import MLP, linen_model
      >>> model = linen_model(MLP(num_classes=3, features=(8,), batch_norm=True))
      >>> params, model_state = model.init(jax.random.key(0), jnp.zeros((1, 4)))
      >>> logits, new_state = model(params, model_state, jnp.ones((5, 4)), train=True,
      ...                           key=jax.random.key(1))
      >>> logits.shape, sorted(new_state)
      ((5, 3), ['batch_stats'])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a flax.linen Module, got {type(module).__name__}.")
    mode_name, inverted = _mode_arg(module, train_arg)
    streams = tuple(rng_streams)

    def mode(train: bool) -> dict[str, bool]:
        return {} if mode_name is None else {mode_name: (not train) if inverted else train}

    def call(params, model_state, x, *, train, key):
        state = dict(model_state or {})
        variables = {"params": params, **state}
        rngs = None
        if train and key is not None and streams:
            rngs = {s: key if i == 0 else jax.random.fold_in(key, i) for i, s in enumerate(streams)}
        if train and state:
            logits, updates = module.apply(
                variables, x, rngs=rngs, mutable=sorted(state), **mode(True)
            )
            return logits, {**state, **dict(updates)}
        return module.apply(variables, x, rngs=rngs, **mode(train)), model_state

    def init(key: jax.Array, example_x) -> tuple[Any, dict[str, Any]]:
        rngs = {"params": key, **{s: jax.random.fold_in(key, i + 1) for i, s in enumerate(streams)}}
        variables = jax.jit(lambda r, x: module.init(r, x, **mode(False)))(rngs, example_x)
        variables = dict(variables)
        params = variables.pop("params", {})
        return (params if checked is None else checked.cast_to_params(params)), variables

    checked = get_policy(policy)
    return Model(call, "linen", checked, init=init, name=type(module).__name__)


def linen_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """A Linen variables dict `{"params", "batch_stats", ...}` as a Model's variables.

    `{"params": variables["params"], "model_state": {every other collection}}`, what
    `Model.eval_apply` of a `linen_model` reads (e.g. teachers read back from your own
    checkpoints, `mtkd_jax.teachers.load_orbax_teachers`). Stacked variables stay stacked.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import linen_variables
      >>> v = linen_variables({"params": {"w": jnp.ones(2)}, "batch_stats": {"m": jnp.zeros(2)}})
      >>> sorted(v), sorted(v["model_state"])
      (['model_state', 'params'], ['batch_stats'])
    """
    rest = dict(variables)
    if "params" not in rest:
        raise ValueError(f"`variables` has no 'params' collection; got {sorted(rest)}.")
    params = rest.pop("params")
    return model_variables(params, rest)
