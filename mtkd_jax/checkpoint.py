"""Kill-safe checkpoints of a train state: the latest few for resume, the best one apart.

A `Checkpointer` holds two orbax `CheckpointManager`s under one directory::

    directory/latest/<step>/{state, meta}   the newest `keep` checkpoints, for resume
    directory/best/<step>/{state, meta}     the single best by a validation metric

Two managers, because one manager with `best_fn` and `max_to_keep` ranks every checkpoint by
the metric and so may delete the newest one, which resume needs.

Each checkpoint is written by orbax into `<step>.orbax-checkpoint-tmp` and renamed to `<step>`
only once complete, so a process killed mid-save leaves a temporary directory that `restore`
never picks up (and that the next `Checkpointer` on the directory cleans away).

`meta` is JSON: the step, the metrics, caller-supplied extras, and the fingerprint of the
teachers the student was trained with (`params_fingerprint`); `restore` refuses a checkpoint
whose fingerprint differs from the one this `Checkpointer` was built with.

A checkpoint whose files cannot be read (a truncated array file, garbled JSON, a missing
file) is skipped by a default `restore` / `metadata` of "latest", which falls back to the next
newest readable one with an `UnreadableCheckpointWarning`; the unreadable directory is left
in place (a read error may be passing, and it is evidence) until a save of the same step
replaces it or `keep` rotates it out. An explicit `step`, "best", or no readable checkpoint at
all raise `UnreadableCheckpointError`. Errors that are the caller's (another teacher
fingerprint, a target of another structure) raise at once and never fall back.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "Checkpointer",
    "Restored",
    "UnreadableCheckpointError",
    "UnreadableCheckpointWarning",
    "params_fingerprint",
]

_WHICH = ("latest", "best")
_MODES = ("max", "min")
_META_KEYS = frozenset({"step", "metrics", "fingerprint", "extra"})
# How long a failed read may wait for orbax's abandoned array reads to finish (see _read).
_SETTLE_SECONDS = 5.0


def params_fingerprint(tree: Any, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """A JSON-able identity of a parameter pytree: its leaves' paths, shapes, dtypes and bytes.

    The SHA-256 runs over, for every leaf in key-path order, its path, dtype, shape and raw
    bytes (C order), so any change of value, shape, dtype or structure changes it. Leaves are
    copied to the host: arrays must be fully addressable (teachers are replicated).

    Args:
      tree: a pytree of arrays, e.g. teacher params (stacked `[K, ...]` or a tuple of K trees).
      names: optional teacher names, recorded as given.

    Returns:
      `{"names": list[str] | None, "leaves": {path: "dtype[shape]"}, "sha256": hex str}`.

    Example:
      >>> import jax.numpy as jnp
      >>> fp = params_fingerprint({"w": jnp.zeros((2, 3))}, names=["mlp"])
      >>> fp["names"], fp["leaves"]
      (['mlp'], {"['w']": 'float32[2, 3]'})
      >>> fp == params_fingerprint({"w": jnp.zeros((2, 3))}, names=["mlp"])
      True
      >>> fp["sha256"] == params_fingerprint({"w": jnp.ones((2, 3))}, names=["mlp"])["sha256"]
      False
    """
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"`names` must be a sequence of str, got {names!r}.")
        names = list(names)
    digest = hashlib.sha256()
    leaves = {}
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        key = jax.tree_util.keystr(path)
        spec = f"{array.dtype.name}{list(array.shape)}"
        # Length-prefixed records, so that no two different trees hash the same byte stream.
        digest.update(f"{key}|{spec}|{array.nbytes}\n".encode())
        digest.update(array.tobytes())
        leaves[key] = spec
    return {"names": names, "leaves": leaves, "sha256": digest.hexdigest()}


def _fingerprint_differences(saved: Any, current: Any) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    if saved == current:
        return []
    if saved is None or current is None:
        have = "no teacher fingerprint" if saved is None else "a teacher fingerprint"
        given = "one" if current is not None else "none"
        return [f"the checkpoint has {have} but {given} was given"]
    out = []
    if saved.get("names") != current.get("names"):
        out.append(f"teacher names {saved.get('names')} != {current.get('names')}")
    old, new = saved.get("leaves", {}), current.get("leaves", {})
    if old.keys() != new.keys():
        missing, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        out.append(f"leaves only in the checkpoint {missing[:5]}, only in the given {added[:5]}")
    changed = [
        f"{k}: {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]
    ]
    if changed:
        out.append("leaf shapes/dtypes differ (" + "; ".join(changed[:5]) + ")")
    if saved.get("sha256") != current.get("sha256"):
        out.append(
            f"content sha256 {str(saved.get('sha256'))[:12]}... != "
            f"{str(current.get('sha256'))[:12]}..."
        )
    return out or ["the fingerprints differ"]


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


class UnreadableCheckpointWarning(UserWarning):
    """A default `restore` / `metadata` skipped newer checkpoints it could not read."""


class UnreadableCheckpointError(RuntimeError):
    """The checkpoint asked for, or every latest checkpoint, could not be read.

    Attributes:
      directory: the `latest/` or `best/` directory.
      errors: `{step: what failed}`, newest first.
    """

    def __init__(self, message: str, *, directory: str, errors: dict[int, str]):
        super().__init__(message)
        self.directory = directory
        self.errors = errors


class _Unreadable(Exception):
    """Reading a checkpoint's files failed (internal: becomes the warning or the error)."""


def _describe(error: BaseException) -> str:
    # orbax wraps tensorstore's error (which names the file) in a generic one; tensorstore
    # appends its whole spec to the message.
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [""]
    text = lines[0].split(" [tensorstore_spec=")[0][:300].rstrip(".")
    return f"{type(error).__name__}: {text}"


def _orbax_leftover(unraisable: Any) -> bool:
    if inspect.iscoroutine(unraisable.object):
        return "orbax" in unraisable.object.cr_code.co_filename
    return str(unraisable.exc_value) == "Event loop is closed"


def _read(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, an orbax read; any failure becomes `_Unreadable(what: error)`.

    When one array read fails, orbax closes its event loop with the other reads still in
    flight: as they finish, tensorstore's callbacks hit the closed loop and the abandoned
    coroutines are garbage-collected, each an "Exception ignored" (`sys.unraisablehook`; an
    error under pytest's warning filters) at some later, unrelated point. So a failed read
    waits (up to `_SETTLE_SECONDS`) until those coroutines are collected, and orbax's
    leftovers are silenced while it runs; other unraisable exceptions pass through.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None if _orbax_leftover(u) else previous(u)
    try:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            failure = f"{what}: {_describe(error)}"
        # Here `error` and its traceback, which hold orbax's abandoned reads, are released.
        _settle_orbax_reads()
        raise _Unreadable(failure)
    finally:
        sys.unraisablehook = previous


def _settle_orbax_reads() -> None:
    deadline = time.monotonic() + _SETTLE_SECONDS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        while True:
            gc.collect()
            live = (o for o in gc.get_objects() if inspect.iscoroutine(o) and o.cr_frame)
            if time.monotonic() > deadline or not any(
                "orbax" in o.cr_code.co_filename for o in live
            ):
                return
            time.sleep(0.01)


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
                        f"cannot open {directory}: {_describe(error)}.",
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
        meta = _read(
            "its `meta`",
            self._manager(which).restore,
            step,
            args=ocp.args.Composite(meta=ocp.args.JsonRestore()),
        )["meta"]
        if not isinstance(meta, dict) or meta.keys() != _META_KEYS or meta["step"] != step:
            raise _Unreadable(f"its `meta` is not this step's metadata: {str(meta)[:100]}")
        return meta

    def _first_readable(self, which: str, step: int | None, read: Callable[[int], Any]) -> Any:
        """`read(step)`; by default of the newest checkpoint in `which` that it can read.

        Without `step`, "latest" tries its checkpoints newest first and warns about those it
        skips; an explicit `step` and "best" are read as they are. `read` raises
        `_Unreadable` when the files fail it; any other error propagates at once (with a note
        naming the checkpoints skipped before it).
        """
        if step is None and which == "latest":
            steps = sorted(self.all_steps(which), reverse=True)
        else:
            step = self._step(which, step)
            steps = [] if step is None else [step]
        where = f"{self.directory}/{which}"
        errors: dict[int, str] = {}
        skipped = lambda: f"{where}: " + "; ".join(f"step {k}: {e}" for k, e in errors.items())
        for s in steps:
            try:
                value = read(s)
            except _Unreadable as error:
                errors[s] = str(error)
                continue
            except Exception as error:
                if errors:
                    error.add_note(f"Skipped before it as unreadable: {skipped()}.")
                raise
            if errors:
                warnings.warn(
                    UnreadableCheckpointWarning(
                        f"skipped unreadable checkpoints in {skipped()}. Using step {s} instead."
                        " The unreadable directories are left as they are; a save of the same"
                        " step replaces one."
                    ),
                    stacklevel=3,
                )
            return value
        if not errors:
            return None
        raise UnreadableCheckpointError(
            f"cannot read {'the checkpoint' if len(steps) == 1 else 'any checkpoint'} in "
            f"{skipped()}.",
            directory=where,
            errors=errors,
        )

    def check_fingerprint(self, metadata: Mapping[str, Any], *, where: str = "checkpoint"):
        """Raise ValueError naming what differs when `metadata`'s fingerprint is not ours."""
        problems = _fingerprint_differences(metadata.get("fingerprint"), self.fingerprint)
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

        def read(step):
            where = f"checkpoint {self.directory}/{which}/{step}"
            meta = self._read_meta(which, step)
            if check_fingerprint:
                self.check_fingerprint(meta, where=where)
            manager = self._manager(which)
            items = _read("its state's metadata", manager.item_metadata, step)
            stored = items.get("state")
            if stored is None:
                raise _Unreadable("its state's metadata is missing (`state/_METADATA`)")
            problems = _target_mismatch(stored, abstract)
            if problems:
                raise ValueError(
                    f"cannot restore {where} into the given `target`: " + "; ".join(problems[:5])
                )
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            return Restored(
                _read("its state", manager.restore, step, args=args)["state"], step, meta
            )

        return self._first_readable(which, step, read)

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
