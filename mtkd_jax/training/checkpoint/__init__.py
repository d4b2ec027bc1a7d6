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
newest readable one with an `UnreadableCheckpointWarning`. The unreadable directory is left in
place (a read error may be passing, and it is evidence), and `all_steps` / `latest_step` still
list it, until a save of the same step replaces it or `keep` rotates it out. An explicit
`step`, "best", or no readable checkpoint at all raise `UnreadableCheckpointError`. Errors
that are the caller's (another teacher fingerprint, a target of another structure) raise at
once and never fall back.
"""

from mtkd_jax.training.checkpoint.checkpointer import Checkpointer, Restored
from mtkd_jax.training.checkpoint.fingerprint import params_fingerprint
from mtkd_jax.training.checkpoint.reading import (
    UnreadableCheckpointError,
    UnreadableCheckpointWarning,
)

__all__ = [
    "Checkpointer",
    "Restored",
    "UnreadableCheckpointError",
    "UnreadableCheckpointWarning",
    "params_fingerprint",
]
