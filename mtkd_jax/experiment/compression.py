"""What distillation buys at inference: parameters, FLOPs per example and measured latency.

Latency is wall-clock time of the jitted forward pass on this backend, the median of
`repeats` calls after a warm-up call (compilation excluded), at batch 1 (one request) and
batch 256 (throughput); FLOPs are XLA's cost analysis (`mtkd_jax.models.flops_per_example`).
The ensemble is timed as one program that runs each teacher's own forward pass
(`ensemble_program`), the same code one teacher is timed with, so the ratio between them
is what K teachers cost, not how well a vmapped convolution compiles. `measure` says which
model it times as it goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.models import count_params, flops_per_example

__all__ = ["ensemble_program", "latency", "profile", "measure"]


def ensemble_program(members: Sequence[tuple[Callable, Any]]) -> tuple[Callable, tuple]:
    """The K teachers as one program: `(apply(params, x) -> [K, B, C], params)`.

    Args:
      members: K `(apply_fn, params)` pairs, `apply_fn(params, x [B, ...]) -> [B, C]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.experiment.compression import ensemble_program
      >>> f = lambda w, x: x @ w
      >>> apply, params = ensemble_program([(f, jnp.ones((4, 2))), (f, jnp.zeros((4, 2)))])
      >>> apply(params, jnp.ones((3, 4))).shape
      (2, 3, 2)
    """
    applies = tuple(a for a, _ in members)
    params = tuple(p for _, p in members)
    if not applies:
        raise ValueError("`members` must hold at least one (apply_fn, params) pair.")

    def apply(ps, x):
        return jnp.stack([a(p, x) for a, p in zip(applies, ps, strict=True)])

    return apply, params


def latency(apply_fn: Callable, params: Any, x: jax.Array, *, repeats: int = 20) -> float:
    """Median seconds of one jitted `apply_fn(params, x)` call, compilation excluded.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.experiment.compression import latency
      >>> latency(lambda w, x: x @ w, jnp.ones((4, 2)), jnp.ones((8, 4)), repeats=3) > 0
      True
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an int >= 1, got {repeats!r}.")
    fn = jax.jit(apply_fn)
    x = jax.device_put(x)
    jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def profile(apply_fn: Callable, params: Any, example_x, *, batch_sizes: Sequence[int] = (1, 256),
            repeats: int = 20) -> dict[str, float]:
    """Parameters, forward FLOPs per example and latency at each batch size of one model.

    Args:
      apply_fn: `(params, x [B, ...]) -> logits [B, C]` (or `[K, B, C]` for an ensemble).
      params: its params.
      example_x: `[N, ...]` inputs; batches of each size are tiled from them.
      batch_sizes: batch sizes to time.
      repeats: timed calls per batch size.

    Returns:
      `{"params", "flops_per_example", "latency_ms_b<B>"...}`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.experiment.compression import profile
      >>> p = profile(lambda w, x: x @ w, jnp.ones((4, 2)), jnp.ones((3, 4)), batch_sizes=(1,),
      ...             repeats=2)
      >>> p["params"], p["flops_per_example"], sorted(p)
      (8, 16.0, ['flops_per_example', 'latency_ms_b1', 'params'])
    """
    example_x = np.asarray(example_x)
    out: dict[str, float] = {
        "params": count_params(params),
        "flops_per_example": flops_per_example(apply_fn, params, jnp.asarray(example_x[:8])),
    }
    for b in batch_sizes:
        reps = -(-b // len(example_x))
        x = np.concatenate([example_x] * reps)[:b]
        out[f"latency_ms_b{b}"] = 1e3 * latency(apply_fn, params, x, repeats=repeats)
    return out


def measure(trained: Mapping[str, tuple[Callable, Any]], *, example_x,
            labels: Mapping[str, str] | None = None, repeats: int = 20,
            batch_sizes: Sequence[int] = (1, 256),
            log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The compression table: the student vs one teacher vs the K-teacher ensemble.

    Args:
      trained: `{"student": (apply, params), "teacher": (apply, params),
        "ensemble": (apply -> [K, B, C], params)}` (missing keys are skipped).
      example_x: `[N, ...]` inputs to time on.
      labels: display name per key (default: the key).
      repeats, batch_sizes: see `profile`.
      log: called with a line before each model is timed (progress), and its seconds after.

    Returns:
      One dict per model: `model`, `params`, `flops_per_example`, `latency_ms_b<B>`, and
      `x_smaller`/`x_fewer_flops`/`x_faster_b<B>`: the ensemble's figure over this model's.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.experiment.compression import measure
      >>> small = (lambda w, x: x @ w, jnp.ones((4, 2)))
      >>> big = (lambda p, x: jnp.stack([x @ p[0], x @ p[1]]), (jnp.ones((4, 2)),) * 2)
      >>> rows = measure({"student": small, "ensemble": big}, example_x=jnp.ones((3, 4)),
      ...                repeats=1, batch_sizes=(1,))
      >>> [r["model"] for r in rows], rows[0]["x_smaller"]
      (['student', 'ensemble'], 2.0)
    """
    labels = dict(labels or {})
    rows = []
    for key in ("student", "teacher", "ensemble"):
        if key not in trained:
            continue
        apply_fn, params = trained[key]
        row = {"model": labels.get(key, key)}
        start = time.perf_counter()
        if log is not None:
            log(f"compression: timing {row['model']} ({repeats} calls at batch "
                f"{', '.join(map(str, batch_sizes))})")
        row.update(profile(apply_fn, params, example_x, batch_sizes=batch_sizes,
                           repeats=repeats))
        if log is not None:
            log(f"  {time.perf_counter() - start:.1f} s")
        rows.append(row)
    ensemble = rows[-1] if "ensemble" in trained else None
    if ensemble is not None:
        for row in rows:
            row["x_smaller"] = ensemble["params"] / row["params"]
            row["x_fewer_flops"] = ensemble["flops_per_example"] / row["flops_per_example"]
            for b in batch_sizes:
                key = f"latency_ms_b{b}"
                row[f"x_faster_b{b}"] = ensemble[key] / row[key]
    return rows
