"""Size and cost of a model: `count_params` and `flops_per_example` (XLA's FLOP count)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["count_params", "flops_per_example"]


def count_params(params: Any) -> int:
    """Total number of scalars in a params pytree.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import count_params
      >>> count_params({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
      16
    """
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(params)))


def flops_per_example(
    apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, example_x: jax.Array
) -> float:
    """Forward FLOPs per example, from XLA's cost analysis of the compiled `apply_fn`.

    The count is XLA's for this backend (a multiply-add counts 2): a measure of the work,
    not a timing.

    Args:
      apply_fn: `(params, x) -> logits`.
      params: its params (arrays or `jax.ShapeDtypeStruct`s).
      example_x: `[B, ...]` input batch (or a `jax.ShapeDtypeStruct`); the total is divided
        by B.

    Returns:
      FLOPs per example, a Python float.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import flops_per_example
      >>> flops_per_example(lambda w, x: x @ w, jnp.zeros((8, 4)), jnp.zeros((16, 8)))
      64.0
    """
    if not jnp.ndim(example_x) or example_x.shape[0] < 1:
        raise ValueError(
            f"`example_x` must be a batch [B, ...] with B >= 1, got shape {jnp.shape(example_x)}."
        )
    cost = jax.jit(apply_fn).lower(params, example_x).compile().cost_analysis()
    # jax 0.10 returns a dict; older versions a list with one dict per computation.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise RuntimeError(
            f"XLA's cost analysis gave no FLOP count on backend {jax.default_backend()!r}."
        )
    return float(cost["flops"]) / example_x.shape[0]
