"""Flax NNX modules as `mtkd_jax.models.Model`s: `nnx_split`.

`model, params, model_state = nnx_split(module)` splits a module the library's way,
whatever layout it came in (a module, or `graphdef, *states` from any `nnx.split` filter
layout):

* `params`: the `nnx.Param` state, the only part the optimizer differentiates;
* `model_state`: every other variable except RNG state (`nnx.BatchStat` and any custom
  `nnx.Variable`), carried in `mtkd_jax.training.state.TrainState.model_state` and checkpointed;
* RNG state (`nnx.RngKey`, `nnx.RngCount`) is not kept: at each training call every RNG
  stream of the module is reseeded from the step's key (stream tag i, in sorted order, gets
  `fold_in(key, i)`; `nnx.reseed`), so Dropout masks depend only on the run's key and
  `state.step`: deterministic, and identical after a resume.

The library sets the mode on every call (`module.train()` / `module.eval()` on the merged
copy), so a module split in either mode trains with Dropout on and BatchNorm updating its
statistics, and evaluates (teachers, `evaluate`) with Dropout off and running statistics.
Dropout layers must hold their RNG stream (`nnx.Dropout(rate, rngs=rngs)`, the NNX default).
Trained state goes back into the module with `nnx.update(module, state.params,
state.model_state)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtkd_jax.core.precision import Policy, get_policy
from mtkd_jax.models.protocol import Model

__all__ = ["nnx_split"]

_MODEL_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))
"""Everything but params and RNG state: what the library carries as `model_state`."""


def _as_module(module: Any, states: tuple) -> nnx.Module:
    if isinstance(module, nnx.GraphDef):
        if not states:
            raise ValueError("`nnx_split(graphdef, *states)` needs the states of `nnx.split`.")
        return nnx.merge(module, *states)
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"`module` must be an nnx.Module or an nnx.GraphDef, got {type(module).__name__}."
        )
    if states:
        raise ValueError("states are given with a GraphDef only, not with a module.")
    return module


def _placeholder(template: Any) -> Any:
    """Fresh RNG state of the template's shapes (overwritten by `reseed` before any use)."""

    def make(sds):
        if jax.dtypes.issubdtype(sds.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jax.random.key(0), sds.shape)
        return jnp.zeros(sds.shape, sds.dtype)

    return jax.tree.map(make, template)


def _split_one(module: nnx.Module):
    graphdef, params, rng_state, model_state = nnx.split(module, nnx.Param, nnx.RngState, ...)
    return graphdef, params, rng_state, model_state


def _stream_tags(module: nnx.Module) -> tuple[str, ...]:
    tags = {
        node.key.tag for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)
    }
    return tuple(sorted(tags))


def nnx_split(
    module: nnx.Module | nnx.GraphDef | Sequence[nnx.Module],
    *states: Any,
    policy: str | Policy | None = None,
) -> tuple[Model, Any, Any]:
    """A Flax NNX module as a `Model`, with its params and model state (see the module doc).

    Args:
      module: an `nnx.Module` (concrete, or abstract from `nnx.eval_shape`); a `GraphDef`
        followed by its `states` from any `nnx.split(...)` filter layout; or a list of K
        modules of one architecture, whose params and model states are stacked (leaves
        `[K, ...]`, e.g. teachers from different seeds).
      *states: with a GraphDef, the states `nnx.split` returned with it.
      policy: a mixed-precision policy (`mtkd_jax.core.precision`), or None.

    Returns:
      `(model, params, model_state)`: `params` an `nnx.State` of the `nnx.Param`s (in the
      policy's params dtype), `model_state` an `nnx.State` of the other non-RNG variables.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models import nnx_split
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(4, 3, rngs=rngs)
      ...         self.bn = nnx.BatchNorm(3, rngs=rngs)
      ...         self.drop = nnx.Dropout(0.5, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.drop(self.bn(self.linear(x)))
      >>> model, params, model_state = nnx_split(Net(nnx.Rngs(0)))
      >>> x = jnp.ones((2, 4))
      >>> logits, new_state = model(params, model_state, x, train=True, key=jax.random.key(1))
      >>> bool(jnp.any(new_state["bn"]["mean"][...] != model_state["bn"]["mean"][...]))
      True
      >>> variables = {"params": params, "model_state": model_state}
      >>> bool(jnp.all(model.eval_apply(variables, x) == model.eval_apply(variables, x)))
      True
    """
    if isinstance(module, list | tuple):
        if not module or states:
            raise ValueError("`module` must be a non-empty list of nnx.Modules, without states.")
        parts = [_split_one(_as_module(m, ())) for m in module]
        graphdef, _, rng_state, _ = parts[0]
        for k, part in enumerate(parts[1:], start=1):
            if part[0] != graphdef:
                raise ValueError(
                    f"`module[{k}]` has another architecture than `module[0]` (their "
                    "graphdefs differ); stack modules of one architecture only."
                )
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        params = jax.tree.map(stack, *(p[1] for p in parts))
        model_state = jax.tree.map(stack, *(p[3] for p in parts))
        first = _as_module(module[0], ())
    else:
        one = _as_module(module, states)
        graphdef, params, rng_state, model_state = _split_one(one)
        first = one
    tags, name = _stream_tags(first), f"NNX {type(first).__name__}"
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), rng_state)
    checked = get_policy(policy)
    if checked is not None:
        params = checked.cast_to_params(params)

    def call(params, model_state, x, *, train, key):
        # Fresh variables in this trace: NNX refuses to mutate one made under another trace
        # (the step's jit, then its grad).
        params, model_state = jax.tree.map(lambda a: a, (params, model_state))
        module = nnx.merge(graphdef, params, _placeholder(template), model_state)
        if train:
            module.train()
            if tags:
                if key is None:
                    raise ValueError(
                        "this NNX module has RNG streams (Dropout): training it needs the "
                        "step's key."
                    )
                nnx.reseed(
                    module,
                    policy="match_shape",
                    **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)},
                )
        else:
            module.eval()
        logits = module(x)
        return logits, nnx.state(module, _MODEL_STATE)

    return Model(call, "nnx", checked, name=name), params, model_state
