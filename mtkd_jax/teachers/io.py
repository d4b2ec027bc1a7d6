"""Saving and loading teachers with orbax, identified by their parameters' fingerprint
(`mtkd_jax.training.checkpoint.params_fingerprint`).

Stacked teachers (leaves `[K, ...]`) and tuples of heterogeneous teachers are written with
a JSON record (kind, K, names, fingerprint, user meta); loading checks the arrays against
the recorded SHA-256, so the record can be handed to a student's checkpointer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from mtkd_jax.models.stacking import num_stacked
from mtkd_jax.training.checkpoint import params_fingerprint

__all__ = ["save_teachers", "load_teachers"]

_FORMAT = "mtkd_jax.teachers/1"


def _num_teachers(params: Any) -> tuple[str, int]:
    if isinstance(params, tuple | list):
        if not params:
            raise ValueError("`params` is an empty tuple; need at least one teacher.")
        return "tuple", len(params)
    return "stacked", num_stacked(params, "params")


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
      "num_teachers", "names", "fingerprint" (`mtkd_jax.training.checkpoint.params_fingerprint` of
      `params` with `names`), "meta"}`.

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
        "fingerprint": params_fingerprint(params, names=names),
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
    not_ours = (
        f"`directory` {path} is not a checkpoint written by `save_teachers` (it holds "
        f"{sorted(os.listdir(path))[:8]}). For teachers saved by your own orbax code "
        "(StandardCheckpointer, CheckpointManager) use "
        "`mtkd_jax.teachers.load_orbax_teachers(path, target)`."
    )
    try:
        items = checkpointer.metadata(path).item_metadata
    except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
        raise ValueError(not_ours) from error
    if items is None or "params" not in items or "record" not in items:
        raise ValueError(not_ours)
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
    if params_fingerprint(params)["sha256"] != record["fingerprint"]["sha256"]:
        raise ValueError(
            f"the arrays in `directory` {path} do not match their recorded SHA-256; the "
            "checkpoint is corrupted or was modified."
        )
    return params, record
