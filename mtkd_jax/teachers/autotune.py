"""Choosing between the "vmap" and "loop" strategies by timing both on an example batch.

Which is faster depends on the model and backend: on a CPU, vmap over conv teachers turns
into grouped convolutions, much slower than the loop, while for MLPs vmap (a batched matmul)
can be the faster (see benchmarks/RESULTS.md). The choice is a static Python decision, made
once outside `jax.jit` when the teacher function is built.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.models.stacking import num_stacked
from mtkd_jax.parallel import broadcast_from_main, process_local
from mtkd_jax.teachers._runners import RUNNERS, ApplyFn

__all__ = ["time_strategies", "choose_strategy"]


def _check_concrete(x: Any, name: str) -> None:
    if any(_checks.is_traced(leaf) for leaf in jax.tree.leaves(x)):
        raise ValueError(
            f"`{name}` is traced: the strategy is timed on concrete arrays, so call this "
            "outside `jax.jit` (e.g. when building the train step)."
        )


def time_strategies(
    apply_fn: ApplyFn,
    stacked_params: Any,
    example_x: jax.Array,
    *,
    num_repeats: int = 5,
    min_seconds: float = 0.02,
) -> dict[str, float]:
    """Seconds per call of each concrete strategy ("vmap", "loop") on an example batch.

    Each is compiled (jitted here, for timing) and run once untimed, then the two are timed
    alternately `num_repeats` times each, in alternating order (spreading background load
    and any after-effect of one on the next over both); the minimum is kept, the least noisy
    estimate of the intrinsic cost. A measurement repeats the call until it lasts about
    `min_seconds`, the same number of calls for both: sub-millisecond calls are otherwise
    ranked by timer and dispatch jitter. Call outside `jax.jit`.

    Args:
      apply_fn: `(params, x) -> logits [B, C]` of one teacher.
      stacked_params: params stacked on a leading K axis.
      example_x: `[B, ...]` a representative input batch (same shape as in training).
      num_repeats: timed measurements per strategy (>= 1).
      min_seconds: target length of one measurement (>= 0).

    Returns:
      `{"vmap": seconds, "loop": seconds}`, per call.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import time_strategies
      >>> t = time_strategies(lambda w, x: x @ w, jnp.ones((3, 4, 2)), jnp.ones((8, 4)),
      ...                     num_repeats=2)
      >>> sorted(t), all(s > 0 for s in t.values())
      (['loop', 'vmap'], True)
    """
    _checks.check_int(num_repeats, "num_repeats")
    if not min_seconds >= 0:
        raise ValueError(f"`min_seconds` must be >= 0, got {min_seconds!r}.")
    _check_concrete(stacked_params, "stacked_params")
    _check_concrete(example_x, "example_x")
    num_stacked(stacked_params, "stacked_params")
    fns = {name: jax.jit(runner(apply_fn)) for name, runner in RUNNERS.items()}

    def seconds(fn, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(stacked_params, example_x)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / calls

    for fn in fns.values():
        jax.block_until_ready(fn(stacked_params, example_x))
    one_call = min(seconds(fn, 1) for fn in fns.values())
    calls = max(1, math.ceil(min_seconds / max(one_call, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(num_repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(seconds(fns[name], calls))
    return {name: min(ts) for name, ts in times.items()}


def choose_strategy(
    apply_fn: ApplyFn,
    stacked_params: Any,
    example_x: jax.Array,
    *,
    num_repeats: int = 5,
    probe_fraction: float = 0.25,
    decisive_ratio: float = 2.0,
) -> str:
    """The faster of "vmap" and "loop" for this model, backend and batch, by `time_strategies`.

    A static Python decision, made once outside `jax.jit`; pass the result as
    `make_stacked_apply(apply_fn, strategy=...)`. Both strategies are first timed on a
    probe, the first `probe_fraction` of the batch; when one is at least `decisive_ratio`
    times slower there it is not run at full size. The slow strategy is usually vmapped
    convolutions (grouped convolutions on CPU: slower, with large scratch buffers at large
    batches; see benchmarks/RESULTS.md), so the probe saves most of the choice's time and
    peak memory exactly where it would be largest. Closer calls are timed on the whole
    `example_x`, since the ranking can change with the batch size.

    In a multi-process run each process times on its own data (its first shard of a global
    array, `mtkd_jax.parallel.process_local`) and process 0's choice is broadcast to all
    (`mtkd_jax.parallel.broadcast_from_main`): they must compile the same program.

    Args:
      apply_fn: `(params, x) -> logits [B, C]` of one teacher.
      stacked_params: params stacked on a leading K axis.
      example_x: `[B, ...]` a representative input batch.
      num_repeats: timed measurements per strategy (>= 1), on the probe and at full size.
      probe_fraction: probe size as a fraction of B, in (0, 1]; 1 (or a probe of fewer than
        one example) skips the probe.
      decisive_ratio: slowdown on the probe (> 1) that settles the choice without a
        full-size run.

    Returns:
      "vmap" or "loop".

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import choose_strategy
      >>> choose_strategy(lambda w, x: x @ w, jnp.ones((3, 4, 2)), jnp.ones((8, 4)),
      ...                 num_repeats=1) in ("vmap", "loop")
      True
    """
    if not 0.0 < probe_fraction <= 1.0:
        raise ValueError(f"`probe_fraction` must be in (0, 1], got {probe_fraction!r}.")
    if not decisive_ratio > 1.0:
        raise ValueError(f"`decisive_ratio` must be > 1, got {decisive_ratio!r}.")
    _check_concrete(stacked_params, "stacked_params")
    _check_concrete(example_x, "example_x")
    # Time on this process's own data (a no-op on one process): timing programs over global
    # arrays would need every process to run the same ones in the same order.
    stacked_params, example_x = process_local((stacked_params, example_x))
    choice = _choose_locally(
        apply_fn, stacked_params, example_x, num_repeats, probe_fraction, decisive_ratio
    )
    # Every process must compile the same step: process 0's choice wins, sent as its index.
    names = tuple(RUNNERS)
    return names[int(broadcast_from_main(np.int32(names.index(choice))))]


def _choose_locally(apply_fn, stacked_params, example_x, num_repeats, probe_fraction, ratio):
    batch = jnp.shape(example_x)[0] if jnp.ndim(example_x) else 0
    probe = int(batch * probe_fraction)
    if 1 <= probe < batch:
        timings = time_strategies(
            apply_fn, stacked_params, example_x[:probe], num_repeats=num_repeats
        )
        fast, slow = sorted(timings, key=timings.get)
        if timings[slow] >= ratio * timings[fast]:
            return fast
    timings = time_strategies(apply_fn, stacked_params, example_x, num_repeats=num_repeats)
    return min(timings, key=timings.get)
