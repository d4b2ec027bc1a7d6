"""A resumable training loop: any step function, deterministic data, kill-safe checkpoints.

`fit` drives `step_fn(state, batch, key) -> (state, metrics)` over `batches_fn(epoch, start)`,
with periodic evaluation, early stopping, the latest and best checkpoints
(`mtkd_jax.training.checkpoint.Checkpointer`), host-side batch checks, a progress bar and a logging
hook. The key is passed to every step unchanged: the library's steps fold `state.step` into
it themselves (the one place a per-step key is made, see `mtkd_jax.training.steps`).

Steps count completed updates: the update that takes `state.step` from n to n + 1 uses
batch `n % steps_per_epoch` of epoch `n // steps_per_epoch`, and its
metrics, like the evaluation and checkpoint made after it, are reported at step n + 1. A run
restarted on the same `checkpoint_dir` restores the newest checkpoint (state, early-stopping
counters, history) and continues where it left off, so with a deterministic `batches_fn` and
step it ends with the same parameters as a run that was never interrupted.

Losses are checked for NaN/inf without a host sync per step: the metrics of up to
`check_every` steps stay on the device while JAX dispatches ahead, then are fetched in one
transfer and checked in order. Checkpoints are written only right after such a check and only
for a state whose floating leaves are all finite, so a non-finite loss never reaches disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import tqdm

from mtkd_jax.core import checks as _checks
from mtkd_jax.training.checkpoint import Checkpointer
from mtkd_jax.training.fit.run import FitRun, NonFiniteLossError
from mtkd_jax.training.fit.tracking import Tracker

__all__ = ["FitResult", "NonFiniteLossError", "fit"]

_MODES = ("max", "min")


class FitResult(NamedTuple):
    """What `fit` returns.

    Attributes:
      state: the final state (after the last update run, or as restored when already done).
      history: `{"train": [...], "eval": [...]}`; a train record holds the means of the step
        metrics over one epoch (`"step"`, `"epoch"`, `"steps"` and one entry per metric,
        arrays as nested lists), an eval record `"step"`, `"epoch"` and `eval_fn`'s metrics.
      best: the best eval record by `best_metric`, or None without evaluations.
      stopped_early: whether patience ran out.
      step: the number of updates behind `state`.
      resumed_from: the step restored from `checkpoint_dir`, or None for a fresh start.
    """

    state: Any
    history: dict[str, list[dict[str, Any]]]
    best: dict[str, Any] | None
    stopped_early: bool
    step: int
    resumed_from: int | None


def fit(
    state: Any,
    step_fn: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, Any]]],
    batches_fn: Callable[[int, int], Iterable[Any]],
    *,
    num_epochs: int,
    steps_per_epoch: int,
    key: jax.Array,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    save_every_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    keep: int = 2,
    best_metric: str = "accuracy",
    best_mode: str = "max",
    min_delta: float = 0.0,
    patience: int | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    check_every: int = 10,
    loss_key: str = "loss",
    num_classes: int | None = None,
    progress: bool = True,
    log_fn: Callable[[int, dict[str, Any]], None] | None = None,
    async_save: bool = True,
) -> FitResult:
    """Train `state` with `step_fn` for `num_epochs`; resume from `checkpoint_dir` if it has one.

    Args:
      state: the initial state, a pytree with an int `step` field (e.g. `TrainState`); also
        the restore target, so optimizer state types survive a resume.
      step_fn: `(state, batch, key) -> (state, metrics)`, jitted by the caller; it must
        increment `state.step` by one; `metrics[loss_key]` is checked for NaN/inf.
      batches_fn: `(epoch, start) -> iterable` yielding batches `start, start+1, ...` of
        `epoch`, in an order fixed by the epoch (and the caller's seed), e.g.
        `lambda e, s: mtkd_jax.data.batches(split, batch_size=64, seed=0, epoch=e, start=s)`.
      num_epochs: epochs to train in total, counting those done before a resume.
      steps_per_epoch: updates per epoch (the iterable may be longer; it must not be shorter).
      key: PRNG key, passed to every `step_fn` call unchanged (the library's steps fold in
        `state.step`; a custom step that wants per-step randomness must do the same).
      eval_fn: `state -> dict` of validation metrics (scalars, or arrays for the history).
      eval_every: evaluate every this many steps (default `steps_per_epoch`).
      checkpoint_dir: where to keep checkpoints (`latest/`, `best/`); None keeps none.
      save_every: write a latest checkpoint every this many steps (default
        `steps_per_epoch`), and always at the end and on early stopping.
      save_every_seconds: also write one when this many seconds of `clock` have passed
        since the last (None: by steps only); a Ctrl-C (KeyboardInterrupt) writes one too
        before it propagates, so an interruption loses at most this much training.
      clock: seconds, for `save_every_seconds` (a test passes a fake one).
      keep: latest checkpoints kept.
      best_metric: the `eval_fn` metric for the best checkpoint and early stopping.
      best_mode: `"max"` (e.g. accuracy) or `"min"` (e.g. the article's validation loss).
      min_delta: the least change that counts as an improvement.
      patience: stop after this many evaluations in a row without improvement (Keras
        `EarlyStopping` semantics); None never stops early.
      fingerprint: the teachers' `params_fingerprint`, saved with each checkpoint; a resume
        with a different one is refused (ValueError).
      check_every: fetch metrics to the host and check the loss every this many steps (also
        at every evaluation, checkpoint and epoch end).
      loss_key: the metric checked for NaN/inf.
      num_classes: C: check every batch on the host before the step (`mtkd_jax.training.batch.
        check_batch`: not empty, labels in `[0, C)` where labeled, finite teacher logits).
        It costs the compiled step nothing; None skips it (e.g. for a custom batch layout).
      progress: show a tqdm bar with rate and ETA (only on JAX process 0).
      log_fn: `log_fn(step, metrics)` with host metrics named `"train/<name>"` for each update
        (called at each check, in step order) and `"eval/<name>"` for each evaluation; only
        on JAX process 0. E.g. a TensorBoard writer.
      async_save: write checkpoints in the background (orbax async checkpointing).

    Returns:
      A `FitResult(state, history, best, stopped_early, step, resumed_from)`.

    Raises:
      NonFiniteLossError: a NaN/inf loss (naming the step) or a non-finite state at a save.
      ValueError: bad arguments; a checkpoint with another teacher fingerprint or another
        `steps_per_epoch`; a `batches_fn` that runs out before `steps_per_epoch`.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from typing import NamedTuple
      >>> class State(NamedTuple):
      ...     step: jax.Array
      ...     params: jax.Array
      ...     opt_state: tuple = ()
      >>> @jax.jit
      ... def step_fn(state, batch, key):  # gradient descent on mean((w - x)^2)
      ...     loss, grad = jax.value_and_grad(lambda w: jnp.mean((w - batch) ** 2))(state.params)
      ...     return State(state.step + 1, state.params - 0.3 * grad), {"loss": loss}
      >>> batches = lambda epoch, start: (np.full(3, 2.0) for _ in range(start, 5))
      >>> out = fit(State(jnp.array(0), jnp.zeros(3)), step_fn, batches, num_epochs=4,
      ...           steps_per_epoch=5, key=jax.random.key(0), progress=False)
      >>> out.step, [round(r["loss"], 3) for r in out.history["train"]]
      (20, [1.984, 0.213, 0.023, 0.002])
    """
    for value, name in (
        (num_epochs, "num_epochs"),
        (steps_per_epoch, "steps_per_epoch"),
        (keep, "keep"),
        (check_every, "check_every"),
    ):
        _checks.check_int(value, name)
    for value, name in (
        (eval_every, "eval_every"),
        (save_every, "save_every"),
        (patience, "patience"),
    ):
        _checks.check_int(value, name, allow_none=True)
    if best_mode not in _MODES:
        raise ValueError(f"`best_mode` must be one of {_MODES}, got {best_mode!r}.")
    if patience is not None and eval_fn is None:
        raise ValueError("`patience` needs an `eval_fn` to measure `best_metric` on.")
    _checks.check_int(num_classes, "num_classes", allow_none=True)
    if save_every_seconds is not None and not save_every_seconds >= 0:
        raise ValueError(f"`save_every_seconds` must be None or >= 0, got {save_every_seconds!r}.")
    if not hasattr(state, "step"):
        raise TypeError(f"`state` must have a `step` field (e.g. TrainState), got {type(state)}.")
    is_main = jax.process_index() == 0
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpointer(
            checkpoint_dir,
            keep=keep,
            best_metric=best_metric,
            best_mode=best_mode,
            fingerprint=fingerprint,
            async_save=async_save,
        )
    run = FitRun(
        state=state,
        step_fn=step_fn,
        batches_fn=batches_fn,
        key=key,
        eval_fn=eval_fn,
        steps_per_epoch=steps_per_epoch,
        total=num_epochs * steps_per_epoch,
        eval_every=eval_every or steps_per_epoch,
        save_every=save_every or steps_per_epoch,
        check_every=check_every,
        loss_key=loss_key,
        patience=patience,
        tracker=Tracker(best_metric=best_metric, best_mode=best_mode, min_delta=min_delta),
        ckpt=ckpt,
        log=log_fn if is_main else None,
        num_classes=num_classes,
        save_every_seconds=save_every_seconds,
        clock=clock,
    )
    try:
        resumed_from = run.resume()
        with tqdm.tqdm(
            total=run.total,
            initial=min(run.step, run.total),
            unit="step",
            dynamic_ncols=True,
            disable=not (progress and is_main),
        ) as run.bar:
            run.train()
    finally:
        if ckpt is not None:
            ckpt.close()
    tracker = run.tracker
    return FitResult(run.state, tracker.history, tracker.best, run.stopped, run.step, resumed_from)
