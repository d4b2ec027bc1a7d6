"""A model the library trains or runs: one protocol, built from functions, Linen or NNX.

The protocol, written once (`Model.apply`)::

    apply(params, model_state, x, *, train: bool, key) -> (logits [B, C], new_model_state)

`params` are what the optimizer differentiates; `model_state` is everything else the model
carries from step to step (BatchNorm statistics; None for a plain function). In training
(`train=True`) Dropout is on with masks drawn from `key` (the step's key, see
`mtkd_jax.training.steps`) and BatchNorm uses and updates batch statistics; in evaluation
(`train=False`) Dropout is off and BatchNorm uses its running statistics. A frozen teacher
or an evaluated student runs as `Model.eval_apply(variables, x) -> logits`, the plain
`apply_fn(params, x)` protocol with the model's **variables** `{"params", "model_state"}`
(`model_variables`, `mtkd_jax.training.state.variables_of`) in place of params, so the stacking and
inference machinery of `mtkd_jax.teachers` runs Models unchanged.

Built by:

* `as_model(fn, pass_key=False)`: a plain `apply_fn(params, x)` (or `apply_fn(params, x,
  key)`), no state; the steps wrap plain functions so, with the numbers they always gave;
* `linen_model(module)`: a Flax Linen module, its non-"params" collections (`batch_stats`)
  mutable in training, `rngs={"dropout": key}`, the `train` (or `deterministic`) argument
  set by the library; `Model.init(key, x) -> (params, model_state)`;
* `mtkd_jax.models.nnx_split(module)`: a Flax NNX module (see `nnx_adapter`).

`as_model` also accepts a Linen or NNX module directly. Every Model may carry a mixed
precision policy (`mtkd_jax.core.precision.Policy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from mtkd_jax.core.precision import Policy, get_policy

__all__ = ["Model", "model_variables", "function_model"]

_VARIABLE_KEYS = ("model_state", "params")


def model_variables(params: Any, model_state: Any = None) -> dict[str, Any]:
    """A model's variables `{"params": params, "model_state": model_state}`.

    What `Model.eval_apply` reads, and so the `teacher_params` of Model teachers (stacked:
    leaves `[K, ...]`) and the `params` given to `evaluate` for a Model student.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import model_variables
      >>> sorted(model_variables({"w": jnp.ones(2)}))
      ['model_state', 'params']
    """
    return {"params": params, "model_state": model_state}


def _cast_like(new: Any, old: Any) -> Any:
    """`new`'s floating leaves in the dtypes of `old`'s (model state keeps its dtypes)."""
    try:
        return jax.tree.map(
            lambda n, o: n.astype(o.dtype) if hasattr(o, "dtype") and n.dtype != o.dtype else n,
            new,
            old,
        )
    except (ValueError, TypeError):
        return new


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model the library trains or runs (see the module docstring for the protocol).

    Attributes:
      call: `call(params, model_state, x, *, train, key) -> (logits, model_state)` in the
        model's own dtypes (the policy is applied around it by `apply`).
      kind: ``"function"``, ``"linen"`` or ``"nnx"``.
      policy: a `mtkd_jax.core.precision.Policy`, or None for no casts.
      init: for Linen, `init(key, example_x) -> (params, model_state)`; else None.
      name: used in error messages.
    """

    call: Callable
    kind: str
    policy: Policy | None = None
    init: Callable | None = None
    name: str = "model"

    def apply(self, params, model_state, x, *, train: bool, key: jax.Array | None = None):
        """`(logits [B, C], new_model_state)`; params and floating `x` in the compute dtype."""
        policy = self.policy
        if policy is not None:
            params, x = policy.cast_to_compute(params), policy.cast_to_compute(x)
        logits, new_state = self.call(params, model_state, x, train=train, key=key)
        if policy is not None:
            logits = policy.cast_to_output(logits)
            new_state = _cast_like(new_state, model_state)
        return logits, new_state

    __call__ = apply

    def eval_apply(self, variables: Mapping[str, Any], x) -> jax.Array:
        """Logits `[B, C]` in evaluation mode (Dropout off, running statistics), frozen state.

        `variables` is `model_variables(params, model_state)`; this is the plain
        `apply_fn(params, x)` protocol that teachers and evaluation run.
        """
        if not isinstance(variables, Mapping) or tuple(sorted(variables)) != _VARIABLE_KEYS:
            got = (
                f"a dict with keys {sorted(variables)}"
                if isinstance(variables, Mapping)
                else type(variables).__name__
            )
            raise ValueError(
                f"{self.name} runs on its variables {{'params', 'model_state'}} "
                "(`mtkd_jax.variables_of(state)` or `mtkd_jax.model_variables(params, "
                f"model_state)`), got {got}."
            )
        logits, _ = self.apply(
            variables["params"], variables["model_state"], x, train=False, key=None
        )
        return logits

    def with_policy(self, policy: str | Policy | None) -> Model:
        """The same model under another mixed-precision policy."""
        return dataclasses.replace(self, policy=get_policy(policy))

    def cast_to_params(self, tree: Any) -> Any:
        """`tree`'s floating leaves in the policy's params dtype (unchanged without one)."""
        return tree if self.policy is None else self.policy.cast_to_params(tree)


def function_model(
    fn: Callable, *, pass_key: bool = False, policy: str | Policy | None = None, name: str = ""
) -> Model:
    """A plain `apply_fn(params, x)` (or `apply_fn(params, x, key)`) as a stateless Model."""
    def call(params, model_state, x, *, train, key):
        del train  # a plain function has no mode
        logits = fn(params, x, key) if pass_key else fn(params, x)
        return logits, model_state

    return Model(call, "function", get_policy(policy), name=name or "model")
