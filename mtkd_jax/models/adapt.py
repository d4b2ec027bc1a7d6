"""Any model the library accepts, as a `mtkd_jax.models.Model`: `as_model`, `eval_apply_of`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from mtkd_jax.core.precision import Policy
from mtkd_jax.models.linen_adapter import linen_model
from mtkd_jax.models.nnx_adapter import nnx_split
from mtkd_jax.models.protocol import Model, function_model

__all__ = ["as_model", "eval_apply_of"]


def as_model(
    model: Any, *, pass_key: bool = False, policy: str | Policy | None = None
) -> Model:
    """Any model the library accepts, as a `Model`.

    Args:
      model: a `Model` (returned as is, or under `policy`); a Flax NNX module (see
        `nnx_split`); a Flax Linen module (`linen_model` with its defaults); or a plain
        `apply_fn(params, x) -> logits` (with `pass_key`, `apply_fn(params, x, key)`).
      pass_key: for a plain function: call it with the step's key.
      policy: a mixed-precision policy (`mtkd_jax.core.precision`), or None to keep the model's.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import as_model
      >>> model = as_model(lambda w, x: x @ w)
      >>> logits, state = model(jnp.eye(2), None, jnp.ones((3, 2)), train=True)
      >>> logits.shape, state, model.kind
      ((3, 2), None, 'function')
    """
    if isinstance(model, Model):
        if pass_key:
            raise ValueError(
                "`pass_key` is for plain apply functions; a Model always gets the step's key."
            )
        return model if policy is None else model.with_policy(policy)
    if isinstance(model, nn.Module):
        return linen_model(model, policy=policy)
    if isinstance(model, nnx.Module):
        return nnx_split(model, policy=policy)[0]
    if not callable(model):
        raise TypeError(
            "a model must be a plain `apply_fn(params, x)`, a flax Linen or NNX module, or a "
            f"`mtkd_jax.models.Model`; got {type(model).__name__}."
        )
    name = getattr(model, "__name__", type(model).__name__)
    return function_model(model, pass_key=pass_key, policy=policy, name=f"model {name!r}")


def eval_apply_of(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """The frozen `apply_fn(params, x) -> logits` of a model, in evaluation mode.

    A plain function is returned as is (its params are its params); any other model (a
    `Model`, a Linen or NNX module) gives `as_model(model).eval_apply`, which takes the
    model's variables (`model_variables`).
    """
    if callable(model) and not isinstance(model, Model | nn.Module | nnx.Module):
        return model
    return as_model(model).eval_apply
