"""A model as a plain function: `apply_fn(params, x) -> logits [B, C]`.

The rest of the library sees a model only through that protocol: `init_params` and
`apply_fn_of` give the params and the function of a Linen module, `nnx_apply_fn` the function
of a Flax NNX module split with `nnx.split`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

__all__ = ["apply_fn_of", "init_params", "nnx_apply_fn"]


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array) -> Any:
    """Initialise a Linen model's parameters from an example batch.

    Args:
      model: a Linen module whose only variable collection is "params" (no batch stats).
      key: PRNG key. On a CPU, compiling the default threefry generator dominates init time;
        a `jax.random.key(seed, impl="rbg")` key compiles several times faster (its values
        differ from threefry's, and under `jax.vmap` from unbatched calls).
      example_x: `[B, ...]` example input; only its shape and dtype matter.

    Returns:
      The params pytree (the "params" collection).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import MLP, init_params
      >>> sorted(init_params(MLP(num_classes=2, features=(3,)), jax.random.key(0),
      ...                    jnp.zeros((1, 5))))
      ['Dense_0', 'Dense_1']
    """
    # One compiled program: eager init compiles the random-bit generator once per kernel
    # shape, seconds each on a CPU.
    variables = jax.jit(model.init)(key, example_x)
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise ValueError(
            f"`model` has variable collections {extra} besides 'params'; `apply_fn_of` "
            "supports stateless models only (params in, logits out)."
        )
    return variables["params"]


def apply_fn_of(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """The plain `apply_fn(params, x) -> logits [B, C]` of a Linen model.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import MLP, init_params, apply_fn_of
      >>> model = MLP(num_classes=2, features=(3,))
      >>> params = init_params(model, jax.random.key(0), jnp.zeros((1, 5)))
      >>> jax.jit(apply_fn_of(model))(params, jnp.ones((4, 5))).shape
      (4, 2)
    """

    def apply_fn(params: Any, x: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x)

    return apply_fn


def nnx_apply_fn(graphdef: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """The plain `apply_fn(state, x) -> logits` of a Flax NNX module split by `nnx.split`.

    `graphdef, state = nnx.split(module)`; the state is the params pytree the rest of the
    library differentiates, stacks and checkpoints. Each call rebuilds the module with
    `nnx.merge` (free under `jax.jit`). For deterministic modules: any state the call mutates
    (e.g. RNG counters of dropout) is not returned.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models import nnx_apply_fn
      >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> jax.jit(nnx_apply_fn(graphdef))(state, jnp.ones((2, 4))).shape
      (2, 3)
    """
    from flax import nnx

    def apply_fn(state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)

    return apply_fn
