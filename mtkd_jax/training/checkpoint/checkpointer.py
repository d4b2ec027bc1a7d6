"""`Checkpointer`: the latest few checkpoints and the best one of a train state, via orbax.

See the package docstring (`mtkd_jax.training.checkpoint`) for the layout on disk and what
happens to unreadable checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtkd_jax.training.checkpoint.fingerprint import fingerprint_differences
from mtkd_jax.training.checkpoint.reading import (
    Unreadable,
    UnreadableCheckpointError,
    describe,
    first_readable,
    read_files,
)

__all__ = ["Checkpointer", "Restored"]

_WHICH = ("latest", "best")
_MODES = ("max", "min")
_META_KEYS = frozenset({"step", "metrics", "fingerprint", "extra"})


def _jsonable(tree: Any) -> Any:
    """Arrays and NumPy scalars to Python numbers and lists, so `json` can write them."""
    if isinstance(tree, Mapping):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, jax.Array | np.ndarray | np.generic):
        return np.asarray(jax.device_get(tree)).tolist()
    return tree


def _abstract(target: Any) -> Any:
    # Shape, dtype and sharding of each live leaf: orbax restores into that layout and the
    # target's tree structure, so NamedTuple optimizer states come back as NamedTuples.
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


def _target_mismatch(stored: Any, abstract: Any) -> list[str]:
    """Paths whose presence or shape differ between the saved tree and the restore target.

    Checked before orbax restores, because an orbax restore that fails on a shape leaves
    un-awaited coroutines behind (warnings at garbage collection) and names one leaf only.
    Dtypes may differ: orbax casts to the target's.
    """
    saved = ocp.tree.to_flat_dict(getattr(stored, "tree", stored))
    wanted = ocp.tree.to_flat_dict(abstract)
    out = []
    for name, keys in (
        ("missing in the target", saved.keys() - wanted.keys()),
        ("not in the checkpoint", wanted.keys() - saved.keys()),
    ):
        if keys:
            out.append(f"{name}: {sorted('.'.join(k) for k in keys)[:5]}")
    for k in sorted(saved.keys() & wanted.keys()):
        have, want = getattr(saved[k], "shape", None), getattr(wanted[k], "shape", None)
        if have is not None and want is not None and tuple(have) != tuple(want):
            out.append(f"{'.'.join(k)} has shape {tuple(have)}, the target {tuple(want)}")
    return out


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns: the state, its step and its JSON metadata."""

    state: Any
    step: int
    metadata: dict[str, Any]


class Checkpointer:
    """The latest `keep` checkpoints plus the best one, with teacher fingerprints, via orbax.

    Args:
      directory: root directory; `latest/` and `best/` are made below it.
      keep: number of latest checkpoints kept (>= 1); the newest is never deleted.
      best_metric: metric name that ranks `save_best` candidates (needed for `save_best`).
      best_mode: `"max"` or `"min"`: whether a larger or smaller `best_metric` is better.
      fingerprint: the teachers' `params_fingerprint` (or any JSON-able dict, or None), written
        with every checkpoint and required to match on `restore`.
      async_save: write in a background thread (orbax async checkpointing); `save` returns
        once the arrays are copied off the device, so the caller may donate them.

    Call `close()` (or use it as a context manager) to wait for pending writes.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> with Checkpointer(tempfile.mkdtemp(), keep=2) as ckpt:
      ...     for step in (1, 2, 3):
      ...         ckpt.save(step, {"w": jnp.full(2, step)}, metrics={"loss": 1.0 / step})
      ...     ckpt.wait()
      ...     ckpt.all_steps(), ckpt.restore({"w": jnp.zeros(2, jnp.int32)}).state
      ([2, 3], {'w': Array([3, 3], dtype=int32)})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        fingerprint: Mapping[str, Any] | None = None,
        async_save: bool = True,
    ):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be an int >= 1, got {keep!r}.")
        if best_mode not in _MODES:
            raise ValueError(f"`best_mode` must be one of {_MODES}, got {best_mode!r}.")
        if fingerprint is not None and not isinstance(fingerprint, Mapping):
            raise TypeError(f"`fingerprint` must be a dict or None, got {type(fingerprint)}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        # Stored and compared in its JSON form, so tuples and lists compare equal.
        self.fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint))
        self._async = async_save
        self._managers: dict[str, ocp.CheckpointManager] = {}

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in _WHICH:
            raise ValueError(f"`which` must be one of {_WHICH}, got {which!r}.")
        if which not in self._managers:
            if which == "latest":
                policy = {"max_to_keep": self.keep}
            else:
                metric = self.best_metric
                policy = {"max_to_keep": 1, "best_mode": self.best_mode}
                if metric is not None:
                    # A safety net: a worse candidate passed to save_best is dropped, not kept.
                    policy["best_fn"] = lambda metrics: metrics[metric]
            directory = os.path.join(self.directory, which)

            def manager(**lightweight):
                options = ocp.CheckpointManagerOptions(
                    **policy,
                    **lightweight,
                    create=True,
                    cleanup_tmp_directories=True,
                    enable_async_checkpointing=self._async,
                )
                # Handlers named up front: a fresh manager can then read an item's metadata
                # before anything was saved or restored through it.
                handlers = {
                    "state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                }
                return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

            try:
                self._managers[which] = manager()
            except Exception as error:
                # orbax reads every step's `_CHECKPOINT_METADATA` (time, metrics) here and
                # fails on one that parses to the wrong types. The best manager ranks by those
                # metrics; the latest one needs neither, so it lists the steps without them
                # and `restore` skips the step if its files cannot be read.
                if which == "best":
                    raise UnreadableCheckpointError(
                        f"cannot open {directory}: {describe(error)}.",
                        directory=directory,
                        errors={},
                    ) from error
                self._managers[which] = manager(lightweight_initialize=True)
        return self._managers[which]

    def _write(self, which, step, state, metrics, extra, orbax_metrics=None) -> None:
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
        meta = {
            "step": int(step),
            "metrics": _jsonable(dict(metrics or {})),
            "fingerprint": self.fingerprint,
            "extra": _jsonable(dict(extra or {})),
        }
        manager = self._manager(which)
        if int(step) in manager.all_steps():
            # orbax refuses an existing step. One is there when a run replays steps after
            # `restore` skipped an unreadable checkpoint (or the caller saves a step again).
            manager.delete(int(step))
        saved = manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=orbax_metrics,
            # Without force, orbax silently skips (returns False) a step <= its latest one.
            force=True,
        )
        if not saved:
            raise RuntimeError(
                f"orbax did not save step {step} in {self.directory}/{which} "
                f"(steps there: {self.all_steps(which)})."
            )

    def save(self, step: int, state: Any, *, metrics=None, extra=None) -> None:
        """Write `state` as latest checkpoint `step`, dropping the oldest beyond `keep`.

        A checkpoint already at `step` (e.g. one that `restore` skipped as unreadable, which a
        resumed run then replays) is replaced.

        Args:
          step: the number of updates behind `state` (int >= 0).
          state: a pytree of arrays (e.g. a `TrainState`).
          metrics: optional dict of scalars or arrays, stored in the JSON metadata.
          extra: optional JSON-able dict stored as `metadata["extra"]` (e.g. loop state).
        """
        self._write("latest", step, state, metrics, extra)

    def save_best(self, step: int, state: Any, *, metrics, extra=None) -> None:
        """Offer `state` as the best checkpoint; kept iff its `best_metric` beats the stored one.

        Args:
          step: the number of updates behind `state`.
          state: a pytree of arrays.
          metrics: dict that holds `best_metric` (a finite scalar).
          extra: optional JSON-able dict stored as `metadata["extra"]`.
        """
        if self.best_metric is None:
            raise ValueError("`save_best` needs the Checkpointer's `best_metric` to be set.")
        if self.best_metric not in metrics:
            raise ValueError(
                f"`metrics` has no {self.best_metric!r} (the best_metric); got {sorted(metrics)}."
            )
        value = float(np.asarray(jax.device_get(metrics[self.best_metric])))
        if not np.isfinite(value):
            raise ValueError(f"`metrics[{self.best_metric!r}]` must be finite, got {value}.")
        self._write("best", step, state, metrics, extra, {self.best_metric: value})

    def all_steps(self, which: str = "latest") -> list[int]:
        """Steps of the complete checkpoints in `which` ("latest" or "best"), ascending."""
        return sorted(self._manager(which).all_steps())

    def latest_step(self) -> int | None:
        """The newest complete latest checkpoint's step, or None when there is none."""
        return self._manager("latest").latest_step()

    def best_step(self) -> int | None:
        """The best checkpoint's step, or None when none was saved."""
        # orbax ranks by the stored metrics: right after a worse candidate was offered, and
        # before its deletion completes, two steps can be listed.
        return self._manager("best").best_step()

    def _step(self, which, step):
        if which not in _WHICH:
            raise ValueError(f"`which` must be one of {_WHICH}, got {which!r}.")
        if step is None:
            return self.latest_step() if which == "latest" else self.best_step()
        steps = self.all_steps(which)
        if step not in steps:
            raise ValueError(
                f"no checkpoint at step {step} in {self.directory}/{which}; steps there: {steps}."
            )
        return step

    def metadata(self, *, which: str = "latest", step: int | None = None) -> dict | None:
        """The JSON metadata of a checkpoint (default: the newest readable in `which`), or None.

        Unreadable checkpoints are handled as in `restore`.
        """
        return self._first_readable(which, step, lambda s: self._read_meta(which, s))

    def _read_meta(self, which: str, step: int) -> dict:
        meta = read_files(
            "its `meta`",
            self._manager(which).restore,
            step,
            args=ocp.args.Composite(meta=ocp.args.JsonRestore()),
        )["meta"]
        if not isinstance(meta, dict) or meta.keys() != _META_KEYS or meta["step"] != step:
            raise Unreadable(f"its `meta` is not this step's metadata: {str(meta)[:100]}")
        return meta

    def _first_readable(self, which: str, step: int | None, read: Callable[[int], Any]) -> Any:
        """`read(step)`; by default of the newest checkpoint in `which` that it can read.

        Without `step`, "latest" tries its checkpoints newest first and warns about those it
        skips; an explicit `step` and "best" are read as they are. `read` raises
        `Unreadable` when the files fail it (see `reading.first_readable`).
        """
        if step is None and which == "latest":
            steps = sorted(self.all_steps(which), reverse=True)
        else:
            step = self._step(which, step)
            steps = [] if step is None else [step]
        return first_readable(steps, read, where=f"{self.directory}/{which}")

    def check_fingerprint(self, metadata: Mapping[str, Any], *, where: str = "checkpoint"):
        """Raise ValueError naming what differs when `metadata`'s fingerprint is not ours."""
        problems = fingerprint_differences(metadata.get("fingerprint"), self.fingerprint)
        if problems:
            raise ValueError(
                f"{where} was trained with different teachers than the given `fingerprint`: "
                + "; ".join(problems)
                + ". Resume with the same teachers, or start in a new checkpoint directory."
            )

    def restore(
        self,
        target: Any,
        *,
        which: str = "latest",
        step: int | None = None,
        check_fingerprint: bool = True,
    ) -> Restored | None:
        """Restore a checkpoint into the structure, dtypes and shardings of `target`.

        Args:
          target: a pytree like the saved state (live arrays or `jax.ShapeDtypeStruct`s);
            optax states (NamedTuples) come back as the same types.
          which: `"latest"` or `"best"`.
          step: a specific step; default the newest in `which`.
          check_fingerprint: refuse (ValueError) a checkpoint whose teacher fingerprint
            differs from this Checkpointer's `fingerprint`.

        Returns:
          `Restored(state, step, metadata)`, or None when `which` holds no checkpoint.

        Raises:
          ValueError: another teacher fingerprint; a `target` of another structure or shapes.
          UnreadableCheckpointError: the checkpoint's files cannot be read (an explicit
            `step`, "best"), or those of no latest checkpoint can.

        Warns:
          UnreadableCheckpointWarning: without `step`, "latest" skipped newer checkpoints
            whose files it could not read; it names each step and its error.
        """
        abstract = _abstract(target)

        def load(step):
            where = f"checkpoint {self.directory}/{which}/{step}"
            meta = self._read_meta(which, step)
            if check_fingerprint:
                self.check_fingerprint(meta, where=where)
            manager = self._manager(which)
            items = read_files("its state's metadata", manager.item_metadata, step)
            stored = items.get("state")
            if stored is None:
                raise Unreadable("its state's metadata is missing (`state/_METADATA`)")
            problems = _target_mismatch(stored, abstract)
            if problems:
                raise ValueError(
                    f"cannot restore {where} into the given `target`: " + "; ".join(problems[:5])
                )
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            return Restored(
                read_files("its state", manager.restore, step, args=args)["state"], step, meta
            )

        return self._first_readable(which, step, load)

    def discard_best_after(self, step: int) -> list[int]:
        """Delete best checkpoints newer than `step` (a resumed run will remake them)."""
        newer = [s for s in self.all_steps("best") if s > step]
        for s in newer:
            self._manager("best").delete(s)
        return newer

    def wait(self) -> None:
        """Block until pending asynchronous writes are complete on disk."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending writes and release the managers (the object stays usable)."""
        managers, self._managers = self._managers, {}
        for manager in managers.values():
            manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
