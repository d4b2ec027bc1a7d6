"""A stateless model as a plain function: `apply_fn(params, x) -> logits [B, C]`.

`init_params` and `apply_fn_of` give the params and the function of a stateless Linen module,
`nnx_apply_fn` the frozen function of a Flax NNX module split with `nnx.split`. Models with
state or randomness (BatchNorm, Dropout) are `mtkd_jax.models.Model`s: `linen_model`,
`nnx_split`.
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
            "supports stateless models only (params in, logits out). Use "
            "`model = mtkd_jax.models.linen_model(module)` and `model.init(key, x)`, which "
            "return the params and the model state (updated by the steps)."
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


def nnx_apply_fn(graphdef: Any, *fixed_states: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """The plain `apply_fn(params, x) -> logits` of a Flax NNX module, in evaluation mode.

    `graphdef, params = nnx.split(module)` for a module whose state is all `nnx.Param`s, or
    `graphdef, params, *rest = nnx.split(module, nnx.Param, ...)` with the other states held
    fixed (`nnx_apply_fn(graphdef, *rest)`): frozen inference, e.g. a teacher. The module runs
    in evaluation mode (Dropout off, BatchNorm running statistics) whatever mode it was split
    in. To **train** a module with Dropout, BatchNorm or RNG state, use
    `mtkd_jax.models.nnx_split`: its `Model` gets the step's key and updates the statistics.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models import nnx_apply_fn
      >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> jax.jit(nnx_apply_fn(graphdef))(state, jnp.ones((2, 4))).shape
      (2, 3)
    """
    from flax import nnx

    def apply_fn(params: Any, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if key is not None:
            raise ValueError(
                "`nnx_apply_fn` gives a frozen, evaluation-mode function, which takes no key "
                "(`pass_key=True`). To train an NNX module with Dropout, give the step the "
                "module itself or `mtkd_jax.models.nnx_split(module)[0]`: it draws the masks "
                "from the step's key and updates the batch statistics."
            )
        others = [
            jax.tree_util.keystr(path)
            for path, v in jax.tree_util.tree_flatten_with_path(
                params, is_leaf=lambda v: isinstance(v, nnx.Variable)
            )[0]
            if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)
        ]
        if others:
            raise ValueError(
                f"`params` holds variables that are not nnx.Param ({others[:4]}): RNG state "
                "or batch statistics cannot be differentiated. Split with "
                "`nnx.split(module, nnx.Param, ...)` and pass the rest to "
                "`nnx_apply_fn(graphdef, *rest)` (frozen), or train it as a Model: "
                "`model, params, model_state = mtkd_jax.models.nnx_split(module)`."
            )
        # Copies made inside the trace: NNX refuses to touch a variable of another trace.
        module = nnx.merge(graphdef, params, *jax.tree.map(lambda a: a, fixed_states))
        module.eval()
        return module(x)

    return apply_fn
