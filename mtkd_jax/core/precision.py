"""Mixed precision: one policy (params, compute and output dtypes) for students and teachers.

A `Policy` says in which dtype a model's params are **stored** (`params_dtype`: what the
optimizer updates, what a checkpoint holds), in which it **computes** (`compute_dtype`: the
params and floating inputs are cast to it for the forward pass) and in which its logits come
**out** (`output_dtype`). A model gets its policy through `mtkd_jax.models.Model`
(`as_model(fn, policy=...)`, `linen_model(module, policy=...)`, `nnx_split(module,
policy=...)`), the same for a student and its teachers.

Whatever the policy, everything after the logits is float32 (or wider): softmax at
temperature, divergences, teacher weights, targets and losses upcast their inputs with
`at_least_float32`, so a bfloat16 model never gives a bfloat16 loss. Non-parameter model
state (BatchNorm statistics) keeps the dtype it is stored in.

* `FLOAT32`: everything float32 (`Policy()`).
* `MIXED_BFLOAT16`: params float32, compute bfloat16, logits float32: training.
* `BFLOAT16`: params and compute bfloat16, logits float32: frozen teachers for inference
  (half the memory; cast the stored params once with `policy.cast_to_params`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Policy",
    "FLOAT32",
    "MIXED_BFLOAT16",
    "BFLOAT16",
    "POLICIES",
    "get_policy",
    "cast_floating",
    "at_least_float32",
]


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast the floating leaves of `tree` to `dtype`; integer, bool and key leaves unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.precision import cast_floating
      >>> out = cast_floating({"w": jnp.ones(2), "i": jnp.arange(2)}, jnp.bfloat16)
      >>> out["w"].dtype, out["i"].dtype
      (dtype(bfloat16), dtype('int32'))
    """

    def cast(x):
        if isinstance(x, jax.Array | jax.ShapeDtypeStruct) or hasattr(x, "dtype"):
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
                if isinstance(x, jax.ShapeDtypeStruct):
                    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
                return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` as float32 when it is a narrower float (bfloat16, float16); wider floats unchanged.

    The one cast that keeps softmaxes, divergences, weights and losses in float32 whatever
    the models compute in.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.precision import at_least_float32
      >>> at_least_float32(jnp.ones(2, jnp.bfloat16)).dtype
      dtype('float32')
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def _dtype(value: Any, name: str):
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a floating dtype, got {value!r}.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating dtype, got {dtype}.")
    return dtype


class Policy(NamedTuple):
    """Params, compute and output dtypes of a model (see the module docstring).

    Attributes:
      params_dtype: dtype the params are stored and updated in.
      compute_dtype: dtype of the forward pass (params and floating inputs are cast to it).
      output_dtype: dtype of the logits the model returns.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.precision import MIXED_BFLOAT16
      >>> p = MIXED_BFLOAT16.cast_to_compute({"w": jnp.ones(2)})
      >>> p["w"].dtype, MIXED_BFLOAT16.cast_to_output(p["w"]).dtype
      (dtype(bfloat16), dtype('float32'))
    """

    params_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def checked(self) -> Policy:
        """The policy with its three dtypes checked as floating `numpy.dtype`s."""
        return Policy(*(_dtype(v, n) for v, n in zip(self, self._fields, strict=True)))

    def cast_to_params(self, tree: Any) -> Any:
        """Floating leaves to `params_dtype` (e.g. bfloat16 teachers: cast once, stored)."""
        return cast_floating(tree, self.params_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Floating leaves to `compute_dtype` (params and inputs of the forward pass)."""
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Floating leaves to `output_dtype` (the logits)."""
        return cast_floating(tree, self.output_dtype)


FLOAT32 = Policy()
MIXED_BFLOAT16 = Policy(jnp.float32, jnp.bfloat16, jnp.float32)
BFLOAT16 = Policy(jnp.bfloat16, jnp.bfloat16, jnp.float32)

POLICIES: dict[str, Policy] = {
    "float32": FLOAT32,
    "mixed_bfloat16": MIXED_BFLOAT16,
    "bfloat16": BFLOAT16,
}
"""Name -> policy."""


def get_policy(policy: str | Policy | None) -> Policy | None:
    """A policy by name in `POLICIES`, a `Policy` checked, or None (no casts at all).

    Example:
      >>> from mtkd_jax.core.precision import get_policy
      >>> get_policy("mixed_bfloat16").compute_dtype
      dtype(bfloat16)
    """
    if policy is None:
        return None
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {sorted(POLICIES)}, got {policy!r}.")
        return POLICIES[policy].checked()
    if not isinstance(policy, Policy):
        raise TypeError(f"`policy` must be a Policy, a name in POLICIES or None, got {policy!r}.")
    return policy.checked()
