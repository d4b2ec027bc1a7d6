"""Teacher ensembles: batched frozen inference, training K teachers at once, save and load.

Two forms of ensemble, both giving logits `[K, B, C]` from one jitted call with the
teachers frozen (`jax.lax.stop_gradient` on the output):

* **Same architecture**: the K param pytrees stacked into one (leading K axis on every
  leaf, `stack_params`), run by `make_stacked_apply` either with `jax.vmap` over K or with a
  loop over the K slices unrolled inside one jit. Which is faster depends on the model and
  backend: on a CPU, vmap over conv teachers turns into grouped convolutions and was measured
  2x-7x slower than the loop, while for MLPs vmap (a batched matmul) was up to 1.3x faster.
  `strategy="auto"` times both once on an example batch and keeps the faster.
* **Heterogeneous**: a tuple of apply functions and a tuple of params
  (`make_heterogeneous_apply`).

Training: `init_ensemble` and `make_ensemble_train_step` train K same-architecture teachers
as one vmapped program (different seeds, and optionally different hyperparameters through
`optax.inject_hyperparams`); heterogeneous teachers train one after another with
`make_teacher_train_step`. `save_teachers` / `load_teachers` write and read them with orbax;
`teacher_fingerprint` identifies a set of teachers by shapes and a content hash.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtkd_jax.checkpoint import params_fingerprint
from mtkd_jax.losses import cross_entropy

__all__ = [
    "STRATEGIES",
    "TeacherState",
    "stack_params",
    "unstack_params",
    "make_stacked_apply",
    "time_strategies",
    "choose_strategy",
    "make_heterogeneous_apply",
    "init_teacher_state",
    "init_ensemble",
    "set_hyperparams",
    "make_teacher_train_step",
    "make_ensemble_train_step",
    "save_teachers",
    "load_teachers",
    "teacher_fingerprint",
]

ApplyFn = Callable[[Any, jax.Array], jax.Array]

_FORMAT = "mtkd_jax.teachers/1"


# --------------------------------------------------------------------------------------
# Stacked parameters
# --------------------------------------------------------------------------------------


def _num_stacked(stacked: Any, name: str) -> int:
    """K, the common leading dimension of every leaf of a stacked pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(stacked)[0]
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; expected a stacked pytree [K, ...].")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} is a scalar; every leaf of a "
                "stacked pytree needs a leading teacher axis [K, ...]."
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        found = ", ".join(f"{k} at {p}" for k, p in sizes.items())
        raise ValueError(f"`{name}` leaves disagree on the leading teacher axis K: {found}.")
    return next(iter(sizes))


def stack_params(params_list: Sequence[Any]) -> Any:
    """Stack K same-structure param pytrees into one with a leading teacher axis.

    Args:
      params_list: K >= 1 pytrees of identical structure and leaf shapes.

    Returns:
      One pytree whose leaves are `[K, *leaf.shape]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import stack_params
      >>> stack_params([{"w": jnp.zeros(3)}, {"w": jnp.ones(3)}])["w"].shape
      (2, 3)
    """
    if isinstance(params_list, Mapping) or not isinstance(params_list, Sequence):
        raise TypeError(
            f"`params_list` must be a list or tuple of K param pytrees, got "
            f"{type(params_list).__name__}."
        )
    if not params_list:
        raise ValueError("`params_list` is empty; need at least one teacher's params.")
    ref_def = jax.tree.structure(params_list[0])
    ref_shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params_list[0])]
    for k, params in enumerate(params_list[1:], start=1):
        if jax.tree.structure(params) != ref_def:
            raise ValueError(
                f"`params_list[{k}]` has a different pytree structure from "
                f"`params_list[0]`; same-architecture teachers are required (use "
                "`make_heterogeneous_apply` for mixed architectures)."
            )
        shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(params)]
        if shapes != ref_shapes:
            bad = next(i for i, (a, b) in enumerate(zip(shapes, ref_shapes, strict=True)) if a != b)
            raise ValueError(
                f"`params_list[{k}]` leaf {bad} has shape {shapes[bad]} but "
                f"`params_list[0]` has {ref_shapes[bad]}."
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def unstack_params(stacked: Any) -> list[Any]:
    """Split a stacked pytree `[K, ...]` into a list of K pytrees (inverse of `stack_params`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import unstack_params
      >>> [p["w"].tolist() for p in unstack_params({"w": jnp.array([[1, 2], [3, 4]])})]
      [[1, 2], [3, 4]]
    """
    k = _num_stacked(stacked, "stacked")
    return [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(k)]


# --------------------------------------------------------------------------------------
# Frozen batched inference
# --------------------------------------------------------------------------------------


def _vmap_runner(apply_fn: ApplyFn) -> ApplyFn:
    return jax.vmap(apply_fn, in_axes=(0, None))


def _loop_runner(apply_fn: ApplyFn) -> ApplyFn:
    def run(stacked_params, x):
        k = _num_stacked(stacked_params, "stacked_params")
        # Unrolled at trace time: K ordinary (ungrouped) forward passes in one program.
        return jnp.stack(
            [apply_fn(jax.tree.map(lambda leaf, i=i: leaf[i], stacked_params), x) for i in range(k)]
        )

    return run


_RUNNERS: dict[str, Callable[[ApplyFn], ApplyFn]] = {"vmap": _vmap_runner, "loop": _loop_runner}

STRATEGIES = ("vmap", "loop", "auto")
"""Ways to run same-architecture teachers: `jax.vmap`, an unrolled loop, or timed choice."""


def _check_concrete(x: Any, name: str) -> None:
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x)):
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

    Each is compiled and run once untimed, then the two are timed alternately `num_repeats`
    times each, in alternating order (spreading background load and any after-effect of
    one on the next over both); the minimum is kept, the least noisy estimate of the
    intrinsic cost. A measurement repeats the call until it lasts about `min_seconds`, the
    same number of calls for both: sub-millisecond calls are otherwise ranked by timer and
    dispatch jitter. Call outside `jax.jit`.

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
    if not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"`num_repeats` must be an integer >= 1, got {num_repeats!r}.")
    if not min_seconds >= 0:
        raise ValueError(f"`min_seconds` must be >= 0, got {min_seconds!r}.")
    _check_concrete(stacked_params, "stacked_params")
    _check_concrete(example_x, "example_x")
    _num_stacked(stacked_params, "stacked_params")
    fns = {name: jax.jit(runner(apply_fn)) for name, runner in _RUNNERS.items()}

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

    A static Python decision, made once outside `jax.jit`. Both strategies are first timed
    on a probe, the first `probe_fraction` of the batch; when one is at least
    `decisive_ratio` times slower there it is not run at full size. The slow strategy is
    usually vmapped convolutions (grouped convolutions on CPU: several times slower and
    several GB of scratch at batch 256), so the probe saves most of the choice's time and
    peak memory exactly where it would be largest. Closer calls are timed on the whole
    `example_x`, since the ranking can change with the batch size.

    In a multi-process run each process times on its own data (its first shard of a global
    array) and process 0's choice is broadcast to all: they must compile the same program.

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
    if jax.process_count() > 1:
        # Time on this process's own data: timing programs over global arrays would need
        # every process to run the same ones in the same order, and the timings differ.
        stacked_params, example_x = _process_local((stacked_params, example_x))
    choice = _choose_locally(
        apply_fn, stacked_params, example_x, num_repeats, probe_fraction, decisive_ratio
    )
    if jax.process_count() > 1:
        # Every process must compile the same step: process 0's choice wins.
        names = tuple(_RUNNERS)
        index = multihost_utils.broadcast_one_to_all(np.int32(names.index(choice)))
        choice = names[int(index)]
    return choice


def _process_local(tree: Any) -> Any:
    """Global arrays that span processes -> this process's first shard (a local array)."""

    def local(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf.addressable_shards[0].data
        return leaf

    return jax.tree.map(local, tree)


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
      apply_fn: `(params, x) -> logits [B, C]` of one teacher.
      strategy: "vmap" (`jax.vmap` over the K axis), "loop" (K forward passes unrolled in one
        jit) or "auto" (times both on `example_params`/`example_x` now, see
        `choose_strategy`). All three compute the same logits.
      example_params: stacked params, needed for "auto".
      example_x: `[B, ...]` representative batch, needed for "auto".
      num_repeats: timed measurements per strategy for "auto" (see `choose_strategy`).

    Returns:
      A jitted `teacher_apply(stacked_params, x [B, ...]) -> logits [K, B, C]` whose output
      is wrapped in `jax.lax.stop_gradient` (the teachers are frozen); its `strategy`
      attribute says which strategy runs.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import make_stacked_apply
      >>> teacher_apply = make_stacked_apply(lambda w, x: x @ w, strategy="loop")
      >>> teacher_apply(jnp.ones((3, 4, 2)), jnp.ones((5, 4))).shape
      (3, 5, 2)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "auto":
        if example_params is None or example_x is None:
            raise ValueError(
                "`strategy`='auto' times both strategies when the function is built: pass "
                "`example_params` (stacked) and `example_x` (a batch [B, ...])."
            )
        strategy = choose_strategy(apply_fn, example_params, example_x, num_repeats=num_repeats)
    run = _RUNNERS[strategy](apply_fn)
    jitted = jax.jit(lambda params, x: jax.lax.stop_gradient(run(params, x)))

    def teacher_apply(stacked_params: Any, x: jax.Array) -> jax.Array:
        return jitted(stacked_params, x)

    teacher_apply.strategy = strategy
    return teacher_apply


def make_heterogeneous_apply(
    apply_fns: Sequence[ApplyFn], *, names: Sequence[str] | None = None
) -> Callable[[Sequence[Any], jax.Array], jax.Array]:
    """Frozen inference of K teachers of different architectures in one jitted call.

    Args:
      apply_fns: K functions `(params_k, x) -> logits [B, C]`; all must give the same C.
      names: optional K names used in error messages (default "teacher k").

    Returns:
      `teacher_apply(params_tuple, x [B, ...]) -> logits [K, B, C]`, jitted, output wrapped
      in `jax.lax.stop_gradient`. Teachers with different output shapes (e.g. class counts)
      raise ValueError at trace time, naming each teacher and its count.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import make_heterogeneous_apply
      >>> linear = lambda w, x: x @ w
      >>> two_layer = lambda p, x: jnp.tanh(x @ p[0]) @ p[1]
      >>> teacher_apply = make_heterogeneous_apply((linear, two_layer))
      >>> params = (jnp.ones((4, 3)), (jnp.ones((4, 8)), jnp.ones((8, 3))))
      >>> teacher_apply(params, jnp.ones((5, 4))).shape
      (2, 5, 3)
    """
    apply_fns = tuple(apply_fns)
    if not apply_fns or not all(callable(f) for f in apply_fns):
        raise TypeError("`apply_fns` must be a non-empty sequence of `(params, x)` callables.")
    k = len(apply_fns)
    names = tuple(f"teacher {i}" for i in range(k)) if names is None else tuple(names)
    if len(names) != k:
        raise ValueError(f"`names` has {len(names)} entries for {k} `apply_fns`.")

    def run(params_tuple, x):
        outs = [f(p, x) for f, p in zip(apply_fns, params_tuple, strict=True)]
        shapes = [jnp.shape(o) for o in outs]
        if any(len(s) < 2 for s in shapes):
            raise ValueError(
                "each teacher must return logits [B, C]; got shapes "
                + ", ".join(f"{n}: {s}" for n, s in zip(names, shapes, strict=True))
                + "."
            )
        if len({s[-1] for s in shapes}) > 1:
            raise ValueError(
                "teachers have different class counts: "
                + ", ".join(f"{n}: {s[-1]}" for n, s in zip(names, shapes, strict=True))
                + "; all teachers must predict the same C classes."
            )
        if len(set(shapes)) > 1:
            raise ValueError(
                "teachers return logits of different shapes: "
                + ", ".join(f"{n}: {s}" for n, s in zip(names, shapes, strict=True))
                + "."
            )
        return jax.lax.stop_gradient(jnp.stack(outs))

    jitted = jax.jit(run)

    def teacher_apply(params_tuple: Sequence[Any], x: jax.Array) -> jax.Array:
        if not isinstance(params_tuple, Sequence) or len(params_tuple) != k:
            got = len(params_tuple) if isinstance(params_tuple, Sequence) else "not a sequence"
            raise ValueError(
                f"`params_tuple` must hold one params pytree per teacher ({k}), got {got}."
            )
        return jitted(tuple(params_tuple), x)

    return teacher_apply


# --------------------------------------------------------------------------------------
# Training teachers
# --------------------------------------------------------------------------------------


class TeacherState(NamedTuple):
    """Train state of one teacher, or of K stacked teachers (every leaf with a K axis).

    Same fields as `mtkd_jax.train.TrainState`, so the two are interchangeable.

    Attributes:
      step: int32 scalar (`[K]` when stacked), number of updates done.
      params: the model's params pytree.
      opt_state: the optax state of `params`.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def init_teacher_state(params: Any, tx: optax.GradientTransformation) -> TeacherState:
    """A single teacher's `TeacherState` at step 0.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_teacher_state
      >>> int(init_teacher_state({"w": jnp.zeros(3)}, optax.sgd(0.1)).step)
      0
    """
    return TeacherState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_ensemble(
    model_init_fn: Callable[[jax.Array], Any],
    keys: jax.Array,
    tx: optax.GradientTransformation,
    *,
    hyperparams: Mapping[str, Any] | None = None,
) -> TeacherState:
    """Stacked `TeacherState` of K teachers of one architecture, one init per key.

    With the default threefry keys, teacher k's params equal `model_init_fn(keys[k])`.

    Args:
      model_init_fn: `key -> params`, e.g.
        `functools.partial(mtkd_jax.models.init_params, model, example_x=x)`.
      keys: `[K]` PRNG keys (e.g. `jax.random.split(key, K)`).
      tx: the optimizer, shared by all teachers.
      hyperparams: optional per-teacher values `[K]` (or scalars) of hyperparameters that
        `tx` injects with `optax.inject_hyperparams`, e.g. `{"learning_rate": lrs}`.

    Returns:
      `TeacherState` with step `[K]` and params / opt_state leaves `[K, ...]`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_ensemble
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> init = lambda key: {"w": jax.random.normal(key, (4, 2))}
      >>> state = init_ensemble(init, jax.random.split(jax.random.key(0), 3), tx,
      ...                       hyperparams={"learning_rate": jnp.array([0.5, 0.25, 0.125])})
      >>> state.params["w"].shape, state.opt_state.hyperparams["learning_rate"].tolist()
      ((3, 4, 2), [0.5, 0.25, 0.125])
    """
    if jnp.ndim(keys) == 0 or (
        not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) and jnp.ndim(keys) != 2
    ):
        raise ValueError(
            f"`keys` must be a batch of K PRNG keys [K] (e.g. jax.random.split(key, K)), "
            f"got shape {jnp.shape(keys)}."
        )
    k = keys.shape[0]
    params = jax.jit(jax.vmap(model_init_fn))(keys)
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    state = TeacherState(jnp.zeros((k,), jnp.int32), params, opt_state)
    if hyperparams:
        state = set_hyperparams(state, hyperparams)
    return state


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def set_hyperparams(state: TeacherState, values: Mapping[str, Any]) -> TeacherState:
    """Set hyperparameters injected by `optax.inject_hyperparams` in a (stacked) state.

    Args:
      state: a `TeacherState` whose optimizer was wrapped by `optax.inject_hyperparams`.
      values: name -> value broadcastable to the stored hyperparameter (`[K]` per teacher for
        a stacked state, a scalar for a single one).

    Returns:
      The state with those hyperparameters replaced (same shapes and dtypes).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_teacher_state, set_hyperparams
      >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
      >>> state = set_hyperparams(init_teacher_state({"w": jnp.zeros(2)}, tx),
      ...                         {"learning_rate": 0.5})
      >>> float(state.opt_state.hyperparams["learning_rate"])
      0.5
    """
    found: set[str] = set()
    any_injected = False

    def replace(node):
        nonlocal any_injected
        if not isinstance(node, _INJECT_STATES):
            return node
        any_injected = True
        hp = dict(node.hyperparams)
        for name, value in values.items():
            if name in hp:
                old = hp[name]
                value = np.asarray(value)
                try:
                    hp[name] = jnp.asarray(np.broadcast_to(value, jnp.shape(old)), old.dtype)
                except ValueError:
                    raise ValueError(
                        f"`values[{name!r}]` has shape {value.shape}, not broadcastable to the "
                        f"stored hyperparameter's shape {jnp.shape(old)} ([K] per teacher)."
                    ) from None
                found.add(name)
        return node._replace(hyperparams=hp)

    opt_state = jax.tree.map(
        replace, state.opt_state, is_leaf=lambda n: isinstance(n, _INJECT_STATES)
    )
    if not any_injected:
        raise ValueError(
            "`state.opt_state` has no injected hyperparameters: build the optimizer with "
            "`optax.inject_hyperparams(optax.sgd)(learning_rate=...)` (or similar)."
        )
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(f"`values` names {missing}, which the optimizer does not inject.")
    return state._replace(opt_state=opt_state)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _single_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None,
):
    def step(state: TeacherState, batch: Mapping[str, jax.Array], key: jax.Array):
        x, y = batch["x"], batch["y"]
        mask = batch.get("label_mask")
        if augment_fn is not None:
            x = augment_fn(x, jax.random.fold_in(key, state.step))

        def loss_fn(params):
            logits = apply_fn(params, x)
            loss = _masked_mean(cross_entropy(logits, y), mask)
            correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
            return loss, _masked_mean(correct, mask)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TeacherState(state.step + 1, params, opt_state)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return step


def make_teacher_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[..., tuple[TeacherState, dict[str, jax.Array]]]:
    """A jitted supervised step for one teacher: cross-entropy on the labels, an optax update.

    Heterogeneous teachers train one after another, each with its own step.

    Args:
      apply_fn: `(params, x) -> logits [B, C]`.
      tx: the optimizer.
      augment_fn: optional `(x, key) -> x` applied to the batch with the per-step key
        `jax.random.fold_in(key, state.step)`; without it the key is unused.

    Returns:
      `step(state, batch, key) -> (state, {"loss": [], "accuracy": []})`; batch holds
      `"x"` `[B, ...]`, `"y"` `[B]` int and optionally `"label_mask"` `[B]` (unlabeled
      examples, mask 0, are left out of the loss and accuracy).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_teacher_state, make_teacher_train_step
      >>> tx = optax.sgd(0.5)
      >>> step = make_teacher_train_step(lambda w, x: x @ w, tx)
      >>> state = init_teacher_state(jnp.zeros((2, 2)), tx)
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([0, 1])}
      >>> for _ in range(3):
      ...     state, metrics = step(state, batch, jax.random.key(0))
      >>> int(state.step), float(metrics["accuracy"])
      (3, 1.0)
    """
    return jax.jit(_single_step(apply_fn, tx, augment_fn))


def make_ensemble_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[..., tuple[TeacherState, dict[str, jax.Array]]]:
    """One jitted step that trains K stacked teachers at once (`jax.vmap` over K).

    Every teacher sees the same batch; teacher k gets the key `jax.random.fold_in(key, k)`,
    so its trajectory equals `make_teacher_train_step(apply_fn, tx)` run on its own slice of
    the state with that key (to float tolerance).

    Args:
      apply_fn: `(params, x) -> logits [B, C]` of one teacher.
      tx: the optimizer (per-teacher hyperparameters via `optax.inject_hyperparams` and
        `init_ensemble(..., hyperparams=...)`).
      augment_fn: optional `(x, key) -> x`, applied per teacher (each gets its own views).

    Returns:
      `step(stacked_state, batch, key) -> (stacked_state, {"loss": [K], "accuracy": [K]})`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from mtkd_jax.teachers import init_ensemble, make_ensemble_train_step
      >>> tx = optax.sgd(0.1)
      >>> init = lambda key: jax.random.normal(key, (3, 2))
      >>> state = init_ensemble(init, jax.random.split(jax.random.key(0), 4), tx)
      >>> step = make_ensemble_train_step(lambda w, x: x @ w, tx)
      >>> batch = {"x": jnp.ones((5, 3)), "y": jnp.zeros(5, jnp.int32)}
      >>> state, metrics = step(state, batch, jax.random.key(1))
      >>> state.step.tolist(), metrics["loss"].shape
      ([1, 1, 1, 1], (4,))
    """
    single = _single_step(apply_fn, tx, augment_fn)

    def step(state: TeacherState, batch: Mapping[str, jax.Array], key: jax.Array):
        if jnp.ndim(state.step) != 1:
            raise ValueError(
                f"`state` must be a stacked TeacherState (step of shape [K]), got step shape "
                f"{jnp.shape(state.step)}; use `init_ensemble`."
            )
        k = state.step.shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k))
        return jax.vmap(single, in_axes=(0, None, 0))(state, batch, keys)

    return jax.jit(step)


# --------------------------------------------------------------------------------------
# Save, load, fingerprint
# --------------------------------------------------------------------------------------


def teacher_fingerprint(params: Any, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Identify a set of teachers: per-leaf shapes and dtypes and a SHA-256 of the contents.

    The same identity as `mtkd_jax.checkpoint.params_fingerprint` (one hashing scheme in the
    library), so the record of `save_teachers` can be handed to a student's checkpointer and
    compared with what a resumed run computes. The hash covers each leaf's path, dtype, shape
    and bytes: any changed weight, shape or layout changes it.

    Args:
      params: any params pytree (stacked, a tuple of heterogeneous teachers, or one model).
      names: optional teacher names, recorded as given.

    Returns:
      `{"names": list[str] | None, "leaves": {path: "dtype[shape]"}, "sha256": hex str}`,
      JSON-serialisable.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.teachers import teacher_fingerprint
      >>> fp = teacher_fingerprint({"w": jnp.zeros((2, 3))})
      >>> fp["leaves"], len(fp["sha256"])
      ({"['w']": 'float32[2, 3]'}, 64)
    """
    return params_fingerprint(params, names=names)


def _num_teachers(params: Any) -> tuple[str, int]:
    if isinstance(params, tuple | list):
        if not params:
            raise ValueError("`params` is an empty tuple; need at least one teacher.")
        return "tuple", len(params)
    return "stacked", _num_stacked(params, "params")


def _checkpointer() -> ocp.Checkpointer:
    # Handlers named up front, so reading metadata knows how to interpret each item.
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            params=ocp.StandardCheckpointHandler(), record=ocp.JsonCheckpointHandler()
        )
    )


def save_teachers(
    directory: str | os.PathLike,
    params: Any,
    *,
    names: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Save teachers with orbax (written to a temporary directory, then renamed: atomic).

    Args:
      directory: the checkpoint directory to create.
      params: stacked params (leaves `[K, ...]`) or a tuple of K heterogeneous params.
      names: K teacher names (default "teacher_0", ...).
      meta: optional JSON-serialisable information (architecture, accuracy, ...).
      overwrite: replace an existing checkpoint at `directory`.

    Returns:
      The record stored next to the arrays: `{"format", "kind" ("stacked" or "tuple"),
      "num_teachers", "names", "fingerprint" (see `teacher_fingerprint`), "meta"}`.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from mtkd_jax.teachers import save_teachers, load_teachers
      >>> path = tempfile.mkdtemp() + "/teachers"
      >>> record = save_teachers(path, {"w": jnp.ones((2, 3))}, meta={"model": "linear"})
      >>> params, loaded = load_teachers(path)
      >>> params["w"].shape, loaded["names"], loaded["meta"]
      ((2, 3), ['teacher_0', 'teacher_1'], {'model': 'linear'})
    """
    kind, k = _num_teachers(params)
    names = [f"teacher_{i}" for i in range(k)] if names is None else list(names)
    if len(names) != k or not all(isinstance(n, str) for n in names):
        raise ValueError(f"`names` must be {k} strings (one per teacher), got {names!r}.")
    if len(set(names)) != k:
        raise ValueError(f"`names` must be unique, got {names!r}.")
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except TypeError as err:
        raise TypeError(f"`meta` must be JSON-serialisable: {err}") from None
    record = {
        "format": _FORMAT,
        "kind": kind,
        "num_teachers": k,
        "names": names,
        "fingerprint": teacher_fingerprint(params, names=names),
        "meta": meta,
    }
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"`directory` {path} already exists; pass overwrite=True to replace it.")
    checkpointer = _checkpointer()
    checkpointer.save(
        path,
        ocp.args.Composite(params=ocp.args.StandardSave(params), record=ocp.args.JsonSave(record)),
        force=overwrite,
    )
    return record


def load_teachers(
    directory: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load teachers written by `save_teachers` and check their content hash.

    Args:
      directory: the checkpoint directory.
      sharding: where to place every array (default: the first local device), e.g. a
        replicated `NamedSharding(mesh, P())`.

    Returns:
      `(params, record)`: params as saved (stacked, or a tuple for heterogeneous teachers)
      and the record returned by `save_teachers`.

    Raises:
      FileNotFoundError: no checkpoint at `directory`.
      ValueError: not a teachers checkpoint, or its arrays do not match the recorded hash.

    Example: see `save_teachers`.
    """
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`directory` {path} holds no teachers checkpoint.")
    checkpointer = _checkpointer()
    items = checkpointer.metadata(path).item_metadata
    if items is None or "params" not in items or "record" not in items:
        raise ValueError(f"`directory` {path} is not a checkpoint written by `save_teachers`.")
    tree = getattr(items["params"], "tree", items["params"])
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree
    )
    restored = checkpointer.restore(
        path,
        ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
        ),
    )
    params, record = restored["params"], restored["record"]
    if record.get("format") != _FORMAT:
        raise ValueError(
            f"`directory` {path} has record format {record.get('format')!r}, expected {_FORMAT!r}."
        )
    if record["kind"] == "tuple":
        params = tuple(params)
    if teacher_fingerprint(params)["sha256"] != record["fingerprint"]["sha256"]:
        raise ValueError(
            f"the arrays in `directory` {path} do not match their recorded SHA-256; the "
            "checkpoint is corrupted or was modified."
        )
    return params, record
