"""The two ways to run K same-architecture teachers held as one stacked pytree.

Both turn a one-teacher `apply_fn(params, x) -> [B, C]` into
`run(stacked_params, x) -> [K, B, C]` with the same logits; they differ only in the program
XLA gets, hence in speed and memory (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtkd_jax.models.stacking import unstack_params

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _vmap_runner(apply_fn: ApplyFn) -> ApplyFn:
    return jax.vmap(apply_fn, in_axes=(0, None))


def _loop_runner(apply_fn: ApplyFn) -> ApplyFn:
    def run(stacked_params, x):
        # Unrolled at trace time: K ordinary (ungrouped) forward passes in one program.
        return jnp.stack([apply_fn(params, x) for params in unstack_params(stacked_params)])

    return run


RUNNERS: dict[str, Callable[[ApplyFn], ApplyFn]] = {"vmap": _vmap_runner, "loop": _loop_runner}

STRATEGIES = (*RUNNERS, "auto")
"""Ways to run same-architecture teachers: `jax.vmap`, an unrolled loop, or timed choice."""
