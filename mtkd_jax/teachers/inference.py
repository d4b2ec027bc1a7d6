"""Frozen inference of K teachers: `teacher_apply(teacher_params, x) -> logits [K, B, C]`.

Two forms of ensemble, both with the teachers frozen (`jax.lax.stop_gradient` on the
output), both un-jitted like every `make_*` of the library (the caller jits, or calls it
inside a jitted step, where the K forward passes compile into one program):

* **Same architecture**: the K param pytrees stacked into one (leading K axis on every
  leaf, `stack_params`), run by `make_stacked_apply` either with `jax.vmap` over K or with a
  loop over the K slices unrolled at trace time. Which is faster depends on the model and
  backend (see benchmarks/RESULTS.md); `strategy="auto"` times both once on an example
  batch (`choose_strategy`) and keeps the faster.
* **Heterogeneous**: a tuple of apply functions and a tuple of params
  (`make_heterogeneous_apply`).

A teacher is a plain `apply_fn(params, x) -> [B, C]` or any `mtkd_jax.models.Model` (or a
Linen or NNX module), which runs in evaluation mode (`Model.eval_apply`: Dropout off,
BatchNorm running statistics, nothing updated) on its variables `{"params",
"model_state"}` (`mtkd_jax.variables_of`, stacked like params).

Teachers that fit only when sharded: the same `teacher_apply`, jitted over a 2-D mesh with
the teachers' shardings as an argument, is `mtkd_jax.parallel.sharded_teacher_apply`
(inside a train step: `mtkd_jax.parallel.sharded_step(..., teacher_shardings=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtkd_jax.models.adapt import eval_apply_of
from mtkd_jax.models.stacking import num_stacked
from mtkd_jax.teachers._runners import RUNNERS, STRATEGIES, ApplyFn
from mtkd_jax.teachers.autotune import choose_strategy

__all__ = ["STRATEGIES", "make_stacked_apply", "make_heterogeneous_apply"]


def _check_batch(x: Any) -> None:
    """`x` is a batch `[B, ...]`: at least one leaf, every leaf with a leading batch axis."""
    leaves = jax.tree.leaves(x)
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        got = "None" if x is None else f"shape {jax.tree.map(jnp.shape, x)}"
        raise ValueError(
            f"`x` must be a batch [B, ...] (a leading batch axis on every leaf), got {got}."
        )


def make_stacked_apply(
    apply_fn: ApplyFn,
    *,
    strategy: str = "auto",
    example_params: Any = None,
    example_x: jax.Array | None = None,
    num_repeats: int = 5,
) -> Callable[[Any, jax.Array], jax.Array]:
    """Frozen inference of K same-architecture teachers held as one stacked pytree.

    Args:
      apply_fn: `(params, x) -> logits [B, C]` of one teacher, or a `mtkd_jax.models.Model`
        (or Linen / NNX module) run in evaluation mode on stacked variables.
      strategy: "vmap" (`jax.vmap` over the K axis), "loop" (K forward passes unrolled at
        trace time) or "auto" (times both on `example_params`/`example_x` now, with
        `choose_strategy`; to know which one runs, call `choose_strategy` yourself and pass
        its result). All three compute the same logits.
      example_params: stacked params, needed for "auto".
      example_x: `[B, ...]` representative batch, needed for "auto".
      num_repeats: timed measurements per strategy for "auto" (see `choose_strategy`).

    Returns:
      An un-jitted `teacher_apply(teacher_params [K, ...], x [B, ...]) -> logits [K, B, C]`
      whose output is wrapped in `jax.lax.stop_gradient` (the teachers are frozen). It
      raises ValueError (at trace time) when `teacher_params` is not a stacked pytree or
      `x` has no batch axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.teachers import make_stacked_apply
      >>> teacher_apply = jax.jit(make_stacked_apply(lambda w, x: x @ w, strategy="loop"))
      >>> teacher_apply(jnp.ones((3, 4, 2)), jnp.ones((5, 4))).shape
      (3, 5, 2)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    apply_fn = eval_apply_of(apply_fn)
    if strategy == "auto":
        if example_params is None or example_x is None:
            raise ValueError(
                "`strategy`='auto' times both strategies when the function is built: pass "
                "`example_params` (stacked) and `example_x` (a batch [B, ...])."
            )
        strategy = choose_strategy(apply_fn, example_params, example_x, num_repeats=num_repeats)
    run = RUNNERS[strategy](apply_fn)

    def teacher_apply(teacher_params: Any, x: jax.Array) -> jax.Array:
        num_stacked(teacher_params, "teacher_params")
        _check_batch(x)
        return jax.lax.stop_gradient(run(teacher_params, x))

    return teacher_apply


def make_heterogeneous_apply(
    apply_fns: Sequence[ApplyFn], *, names: Sequence[str] | None = None
) -> Callable[[Sequence[Any], jax.Array], jax.Array]:
    """Frozen inference of K teachers of different architectures, stacked into one output.

    Args:
      apply_fns: K functions `(params_k, x) -> logits [B, C]` (or `mtkd_jax.models.Model`s,
        run in evaluation mode on their variables); all must give the same C.
      names: optional K names used in error messages (default "teacher k").

    Returns:
      An un-jitted `teacher_apply(teacher_params, x [B, ...]) -> logits [K, B, C]`, with
      `teacher_params` a tuple (or list) of the K teachers' params, output wrapped in
      `jax.lax.stop_gradient`. Jitted (or inside a jitted step), the K forward passes are
      one program. Raises ValueError when `teacher_params` is not K pytrees, `x` has no
      batch axis, or (at trace time) the teachers' output shapes or class counts differ,
      naming each teacher and its count.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.teachers import make_heterogeneous_apply
      >>> linear = lambda w, x: x @ w
      >>> two_layer = lambda p, x: jnp.tanh(x @ p[0]) @ p[1]
      >>> teacher_apply = jax.jit(make_heterogeneous_apply((linear, two_layer)))
      >>> params = (jnp.ones((4, 3)), (jnp.ones((4, 8)), jnp.ones((8, 3))))
      >>> teacher_apply(params, jnp.ones((5, 4))).shape
      (2, 5, 3)
    """
    apply_fns = tuple(apply_fns)
    if apply_fns and all(callable(f) for f in apply_fns):
        apply_fns = tuple(eval_apply_of(f) for f in apply_fns)
    if not apply_fns or not all(callable(f) for f in apply_fns):
        raise TypeError("`apply_fns` must be a non-empty sequence of `(params, x)` callables.")
    k = len(apply_fns)
    names = tuple(f"teacher {i}" for i in range(k)) if names is None else tuple(names)
    if len(names) != k:
        raise ValueError(f"`names` has {len(names)} entries for {k} `apply_fns`.")

    def listed(values) -> str:
        return ", ".join(f"{n}: {v}" for n, v in zip(names, values, strict=True))

    def teacher_apply(teacher_params: Sequence[Any], x: jax.Array) -> jax.Array:
        if not isinstance(teacher_params, Sequence) or len(teacher_params) != k:
            if isinstance(teacher_params, Sequence):
                got = str(len(teacher_params))
            else:
                got = "None" if teacher_params is None else f"a {type(teacher_params).__name__}"
            raise ValueError(
                f"`teacher_params` must be a tuple holding one params pytree per teacher "
                f"({k}), got {got}."
            )
        _check_batch(x)
        outs = [f(p, x) for f, p in zip(apply_fns, teacher_params, strict=True)]
        shapes = [jnp.shape(o) for o in outs]
        if any(len(s) < 2 for s in shapes):
            raise ValueError(
                f"each teacher must return logits [B, C]; got shapes {listed(shapes)}."
            )
        if len({s[-1] for s in shapes}) > 1:
            raise ValueError(
                f"teachers have different class counts: {listed(s[-1] for s in shapes)}; all "
                "teachers must predict the same C classes."
            )
        if len(set(shapes)) > 1:
            raise ValueError(f"teachers return logits of different shapes: {listed(shapes)}.")
        return jax.lax.stop_gradient(jnp.stack(outs))

    return teacher_apply
