"""The mutable side of one `mtkd_jax.training.fit.fit` call: state, step counter, pending metrics,
and what it does at each update (host checks, loss checks, evaluation, checkpoints)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mtkd_jax.training.batch import check_batch
from mtkd_jax.training.checkpoint import Checkpointer
from mtkd_jax.training.fit.tracking import Tracker, all_finite, host_value

__all__ = ["FitRun", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss (or state); the last good checkpoint is kept.

    Attributes:
      step: `state.step` going into the failing update.
      last_checkpoint_step: step of the newest checkpoint written (all finite), or None.
    """

    def __init__(self, message: str, *, step: int, last_checkpoint_step: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint_step = last_checkpoint_step


def _cause(metrics: Mapping[str, Any]) -> str:
    """What the step's metrics tell about a non-finite loss (the distill step reports whether
    its teachers' logits were finite)."""
    finite = metrics.get("teacher_logits_finite")
    if finite is not None and not np.all(np.asarray(finite) >= 1):
        return (
            ": the teachers' logits were NaN/inf in this batch (the teachers or the cache they "
            "were read from, not the student)"
        )
    return ""


@dataclasses.dataclass
class FitRun:
    """The mutable side of one `fit` call: the state, the step counter, pending metrics."""

    state: Any
    step_fn: Callable
    batches_fn: Callable
    key: jax.Array
    eval_fn: Callable | None
    steps_per_epoch: int
    total: int
    eval_every: int
    save_every: int
    check_every: int
    loss_key: str
    patience: int | None
    tracker: Tracker
    ckpt: Checkpointer | None
    log: Callable | None
    num_classes: int | None = None
    save_every_seconds: float | None = None
    clock: Callable[[], float] = time.monotonic
    bar: Any = None
    step: int = 0
    completed: int = 0  # the last step whose evaluation and checkpoint are done
    last_saved: int | None = None
    last_save_time: float = 0.0
    stopped: bool = False
    pending: list = dataclasses.field(default_factory=list)

    def resume(self) -> int | None:
        """Restore the newest checkpoint, if any; return its step."""
        self.step = int(jax.device_get(self.state.step))
        restored = None if self.ckpt is None else self.ckpt.restore(self.state)
        if restored is not None:
            where = f"checkpoint {self.ckpt.directory}/latest/{restored.step}"
            loop_meta = restored.metadata["extra"].get("loop")
            if loop_meta is None:
                raise ValueError(
                    f"{where} holds no loop state (was it written by `fit`?); use a new "
                    "checkpoint directory, or restore it with `Checkpointer.restore`."
                )
            saved = loop_meta["steps_per_epoch"]
            if saved != self.steps_per_epoch:
                raise ValueError(
                    f"{where} was made with steps_per_epoch={saved}, not "
                    f"{self.steps_per_epoch}: the data order would differ. Use the same value "
                    "or a new checkpoint directory."
                )
            self.tracker.load(loop_meta["tracker"])
            self.state, self.step = restored.state, restored.step
            self.last_saved = restored.step
            # Best checkpoints after the resumed step belong to the lost part of the run,
            # which is about to be replayed (and orbax would not save those steps again).
            self.ckpt.discard_best_after(restored.step)
        self.stopped = self.patience is not None and self.tracker.bad_evals >= self.patience
        self.completed = self.step
        self.last_save_time = self.clock()
        return None if restored is None else restored.step

    def train(self) -> None:
        try:
            self._train()
        except KeyboardInterrupt:
            self._save_interrupted()
            raise

    def _save_interrupted(self) -> None:
        """On Ctrl-C: keep the updates since the last checkpoint, when the interrupted step
        had finished (its metrics, evaluation and checkpoint); else the last one stands.
        Not with several processes: a save is collective, and one host's Ctrl-C is not the
        others'."""
        if (self.ckpt is None or jax.process_count() > 1 or self.step == self.last_saved
                or self.completed != self.step
                or int(jax.device_get(self.state.step)) != self.step):
            return
        try:
            self._flush()
            self._save()
        except Exception:  # noqa: BLE001 - the interrupt is what the caller must see
            return

    def _train(self) -> None:
        while self.step < self.total and not self.stopped:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            batches = iter(self.batches_fn(epoch, start))
            try:
                self._epoch(batches, epoch, start)
            finally:
                # Release a generator's resources (files, threads) when stopping early.
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

    def _epoch(self, batches, epoch: int, start: int) -> None:
        for index in range(start, self.steps_per_epoch):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"`batches_fn({epoch}, {start})` ran out after {index - start} batches; "
                    f"it must yield at least steps_per_epoch - start = "
                    f"{self.steps_per_epoch - start}."
                ) from None
            if self.num_classes is not None and isinstance(batch, dict):
                check_batch(batch, num_classes=self.num_classes)
            self.state, metrics = self.step_fn(self.state, batch, self.key)
            self.pending.append((self.step, metrics))
            self.step += 1
            self.bar.update(1)

            end_of_epoch = index == self.steps_per_epoch - 1
            at_eval = self.eval_fn is not None and self.step % self.eval_every == 0
            at_save = self.ckpt is not None and (
                self.step % self.save_every == 0 or self.step == self.total
                or (self.save_every_seconds is not None
                    and self.clock() - self.last_save_time >= self.save_every_seconds)
            )
            if len(self.pending) >= self.check_every or end_of_epoch or at_eval or at_save:
                self._flush()
            if end_of_epoch:
                self.tracker.close_epoch(step=self.step, epoch=epoch)
            if at_eval:
                self._evaluate(epoch)
            if self.ckpt is not None and (at_save or self.stopped):
                self._save()
            self.completed = self.step
            if self.stopped:
                return

    def _flush(self) -> None:
        """Fetch the pending metrics in one transfer; check the losses; log them."""
        host = jax.device_get([metrics for _, metrics in self.pending])
        for (n, _), metrics in zip(self.pending, host, strict=True):
            if self.loss_key not in metrics:
                raise ValueError(
                    f"`step_fn` metrics must hold {self.loss_key!r} (the `loss_key`); "
                    f"got {sorted(metrics)}."
                )
            loss = np.asarray(metrics[self.loss_key])
            if not np.all(np.isfinite(loss)):
                epoch, batch = divmod(n, self.steps_per_epoch)
                raise NonFiniteLossError(
                    f"non-finite {self.loss_key} ({loss.tolist()}) at step {n} (the update "
                    f"from state.step={n}: epoch {epoch}, batch {batch}){_cause(metrics)}; "
                    f"{self._kept()}.",
                    step=n,
                    last_checkpoint_step=self.last_saved,
                )
            self.tracker.add_train(metrics)
            if self.log is not None:
                self.log(n + 1, {f"train/{k}": host_value(v) for k, v in metrics.items()})
        if host:
            last = float(np.mean(host[-1][self.loss_key]))
            self.bar.set_postfix({self.loss_key: f"{last:.4g}"}, refresh=False)
        self.pending.clear()

    def _kept(self) -> str:
        if self.last_saved is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}/latest"

    def _evaluate(self, epoch: int) -> None:
        record = {"step": self.step, "epoch": epoch}
        metrics = jax.device_get(dict(self.eval_fn(self.state)))
        record.update({k: host_value(v) for k, v in metrics.items()})
        improved = self.tracker.add_eval(record)
        self.stopped = self.patience is not None and self.tracker.bad_evals >= self.patience
        if self.log is not None:
            self.log(self.step, {f"eval/{k}": host_value(v) for k, v in metrics.items()})
        metric = self.tracker.best_metric
        self.bar.set_postfix({metric: f"{record[metric]:.4g}"}, refresh=False)
        if self.stopped:
            # The stopped epoch's train record covers the steps it ran.
            self.tracker.close_epoch(step=self.step, epoch=epoch)
        if improved and self.ckpt is not None:
            self.ckpt.save_best(self.step, self.state, metrics=record)

    def _save(self) -> None:
        """Write the latest checkpoint, after the caller flushed (so all losses were finite)."""
        if not bool(all_finite(self.state)):
            raise NonFiniteLossError(
                f"the state after step {self.step} holds NaN/inf although every "
                f"{self.loss_key} so far was finite; not saved ({self._kept()}).",
                step=self.step - 1,
                last_checkpoint_step=self.last_saved,
            )
        counted = int(jax.device_get(self.state.step))
        if counted != self.step:
            raise ValueError(
                f"`step_fn` must add 1 to `state.step` per call: after {self.step} updates "
                f"state.step is {counted}."
            )
        history = self.tracker.history
        metrics = {
            "train": history["train"][-1] if history["train"] else None,
            "eval": history["eval"][-1] if history["eval"] else None,
        }
        extra = {
            "loop": {"steps_per_epoch": self.steps_per_epoch, "tracker": self.tracker.to_json()}
        }
        self.ckpt.save(self.step, self.state, metrics=metrics, extra=extra)
        self.last_saved = self.step
        self.last_save_time = self.clock()
