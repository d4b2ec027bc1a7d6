"""Failures to read a checkpoint's files: the warning, the error, and one guarded orbax read.

`read_files` runs one orbax read and turns any failure into `Unreadable` (internal);
`first_readable` tries checkpoints in order past those, with an `UnreadableCheckpointWarning`
for the skipped ones, or an `UnreadableCheckpointError` when none can be read.
"""

from __future__ import annotations

import gc
import inspect
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Unreadable",
    "UnreadableCheckpointError",
    "UnreadableCheckpointWarning",
    "describe",
    "first_readable",
    "read_files",
]

# How long a failed read may wait for orbax's abandoned array reads to finish (see `read_files`).
_SETTLE_SECONDS = 5.0


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


class Unreadable(Exception):
    """Reading a checkpoint's files failed (internal: becomes the warning or the error)."""


def describe(error: BaseException) -> str:
    """One line naming an error of orbax or tensorstore: its root cause, without the spec."""
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


def read_files(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, an orbax read; any failure becomes `Unreadable(what: error)`.

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
            failure = f"{what}: {describe(error)}"
        # Here `error` and its traceback, which hold orbax's abandoned reads, are released.
        _settle_orbax_reads()
        raise Unreadable(failure)
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


def first_readable(steps: Sequence[int], read: Callable[[int], Any], *, where: str) -> Any:
    """`read(step)` of the first of `steps` whose files it can read; None without steps.

    `read` raises `Unreadable` when the files fail it: that step is skipped, and when a later
    one is read an `UnreadableCheckpointWarning` names each skipped step and its error. When
    none can be read, `UnreadableCheckpointError` names them all. Any other error of `read`
    (the caller's: another fingerprint, another target structure) propagates at once, with a
    note naming the steps skipped before it.

    Args:
      steps: the candidates, in the order to try them (newest first).
      read: `step -> value`.
      where: the directory, for the messages.
    """
    errors: dict[int, str] = {}
    skipped = lambda: f"{where}: " + "; ".join(f"step {k}: {e}" for k, e in errors.items())
    for s in steps:
        try:
            value = read(s)
        except Unreadable as error:
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
                stacklevel=4,
            )
        return value
    if not errors:
        return None
    raise UnreadableCheckpointError(
        f"cannot read {'the checkpoint' if len(steps) == 1 else 'any checkpoint'} in {skipped()}.",
        directory=where,
        errors=errors,
    )
