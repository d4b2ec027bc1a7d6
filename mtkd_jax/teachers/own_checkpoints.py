"""Teachers from checkpoints you already have: plain orbax, Linen or NNX, one or K stacked.

`load_orbax_teachers(paths, target)` reads what users' own code wrote with orbax:

* a **StandardCheckpointer** (or PyTreeCheckpointer) directory:
  `ocp.StandardCheckpointer().save(path, params)`;
* a **CheckpointManager** directory: `manager.save(step, args=ocp.args.StandardSave(tree))`
  (item ``default``) or `ocp.args.Composite(name=...)` (pass `item=name`), at the newest step
  or the given `step`.

The `target` says what to read: a pytree of arrays or `jax.ShapeDtypeStruct`s (Linen params,
`jax.eval_shape(model.init, key, x)["params"]`, or a variables dict with ``batch_stats``), or
an `nnx.Module` (abstract from `nnx.eval_shape`, or concrete: its values are not used) whose
`nnx.state` was saved. Entries are matched by path, NNX's ``.value`` level or not, and the
target may sit under a prefix of the saved tree (a whole train state saved, its
``params`` wanted), found by itself or named with `subtree`. Anything that does not match
raises a `ValueError` naming the directory, what is missing, what differs and what the
checkpoint holds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mtkd_jax.models.protocol import model_variables
from mtkd_jax.models.stacking import stack_params

__all__ = ["load_orbax_teachers"]

_STEP = re.compile(r"^(?:.*_)?(\d+)$")
_LISTED = 6


def _listing(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _is_item(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_METADATA"))


def _item_dir(path: str, step: int | None, item: str | None) -> tuple[str, str]:
    """The directory holding the pytree, and a description of the layout found."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}.")
    if _is_item(path):
        if step is not None or item is not None:
            raise ValueError(
                f"{path} is a single checkpoint (StandardCheckpointer layout): `step` and "
                "`item` apply to CheckpointManager directories only."
            )
        return path, "a StandardCheckpointer checkpoint"
    entries = _listing(path)
    steps = {
        int(m.group(1)): name
        for name in entries
        if (m := _STEP.match(name)) and os.path.isdir(os.path.join(path, name))
    }
    items = [e for e in entries if _is_item(os.path.join(path, e))]
    if steps and not items:
        chosen = max(steps) if step is None else step
        if chosen not in steps:
            raise ValueError(
                f"{path} is a CheckpointManager directory with steps {sorted(steps)}; it has "
                f"no step {step}."
            )
        step_dir = os.path.join(path, steps[chosen])
        layout = f"a CheckpointManager directory, step {chosen} of {sorted(steps)}"
        items = [e for e in _listing(step_dir) if _is_item(os.path.join(step_dir, e))]
    elif items:
        if step is not None:
            raise ValueError(f"{path} is one step of a CheckpointManager: `step` does not apply.")
        step_dir, layout = path, "a CheckpointManager step directory"
    else:
        raise ValueError(
            f"no orbax checkpoint at {path}: it holds {entries[:10] or 'nothing'} (expected a "
            "StandardCheckpointer directory, with `_METADATA`, or a CheckpointManager "
            "directory of steps)."
        )
    if item is None:
        if len(items) != 1:
            raise ValueError(
                f"{path} ({layout}) holds the items {items}: pass `item=` to choose one."
            )
        item = items[0]
    if item not in items:
        raise ValueError(f"{path} ({layout}) has no item {item!r}; its items are {items}.")
    return os.path.join(step_dir, item), f"{layout}, item {item!r}"


def _names(path) -> tuple[str, ...]:
    """A pytree key path as strings, without NNX's trailing ``value``."""
    out = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
        else:
            out.append(str(entry))
    return _norm(tuple(out))


def _norm(names: tuple) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    return names[:-1] if names and names[-1] == "value" else names


def _describe(flat: dict, limit: int = _LISTED) -> str:
    shown = [
        f"{'.'.join(k)} {tuple(m.shape)} {np.dtype(m.dtype) if hasattr(m, 'dtype') else ''}"
        for k, m in list(flat.items())[:limit]
    ]
    more = f", ... ({len(flat)} arrays)" if len(flat) > limit else ""
    return "[" + ", ".join(shown) + more + "]"


def _is_rng(meta) -> bool:
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and np.dtype(dtype) == np.uint32


def _match(saved: dict, wanted: dict, subtree: str | None, where: str) -> tuple[str, ...]:
    """The prefix of the saved tree under which every wanted path is, with equal shapes."""
    if subtree is not None:
        prefixes = [tuple(p for p in subtree.replace("/", ".").split(".") if p)]
    else:
        prefixes = [()] + sorted({k[:i] for k in saved for i in range(1, len(k))}, key=len)
    scored = [(sum(p + w in saved for w in wanted), p) for p in prefixes]
    best = max(s for s, _ in scored)
    full = [p for s, p in scored if s == len(wanted)]
    if full and len([p for p in full if len(p) == len(full[0])]) > 1:
        raise ValueError(
            f"{where}: the target matches several parts of the checkpoint "
            f"({['.'.join(p) for p in full[:4]]}): pass `subtree=` to choose one."
        )
    prefix = full[0] if full else next(p for s, p in scored if s == best)
    problems = []
    missing = [w for w in wanted if prefix + w not in saved]
    if missing:
        problems.append("missing in the checkpoint: " + _describe({w: wanted[w] for w in missing}))
    bad = [
        f"{'.'.join(w)} is {tuple(saved[prefix + w].shape)} there, {tuple(wanted[w].shape)} in "
        "the target"
        for w in wanted
        if prefix + w in saved and tuple(saved[prefix + w].shape) != tuple(wanted[w].shape)
    ]
    if bad:
        problems.append("shapes differ: " + "; ".join(bad[:_LISTED]))
    extra = {
        k: m
        for k, m in saved.items()
        if k[: len(prefix)] == prefix and k[len(prefix):] not in wanted and not _is_rng(m)
    }
    if extra and not missing:
        problems.append("in the checkpoint but not in the target: " + _describe(extra))
    if problems:
        under = f" (compared under {'.'.join(prefix)!r})" if prefix else ""
        raise ValueError(
            f"{where} does not match the target{under}: " + "; ".join(problems)
            + f". The checkpoint holds {_describe(saved)}."
        )
    return prefix


def _target_parts(target: Any) -> tuple[list[Any], Any]:
    """(pytrees of abstract leaves to fill, rebuild(filled pytrees) -> result)."""
    if isinstance(target, nnx.Module):
        _, params, _, rest = nnx.split(target, nnx.Param, nnx.RngState, ...)
        return [params, rest], lambda filled: model_variables(*filled)
    return [target], lambda filled: filled[0]


def _read_one(path: str, target: Any, step, item, subtree, sharding) -> Any:
    directory, layout = _item_dir(os.path.abspath(os.fspath(path)), step, item)
    where = f"{directory} ({layout})"
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
    tree = getattr(meta, "tree", meta)
    saved = {_norm(k): m for k, m in ocp.tree.to_flat_dict(tree).items()}
    parts, rebuild = _target_parts(target)
    flattened = [jax.tree_util.tree_flatten_with_path(part) for part in parts]
    wanted = {}
    for leaves, _ in flattened:
        for p, leaf in leaves:
            if _names(p) in wanted:
                raise ValueError(f"the target has two leaves at {'.'.join(_names(p))}.")
            wanted[_names(p)] = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
    if not wanted:
        raise ValueError("the target has no array leaves.")
    prefix = _match(saved, wanted, subtree, where)
    needed = {prefix + w: s for w, s in wanted.items()}

    def skeleton(node, names=()):
        # The saved tree's own containers (lists stay lists), the leaves not wanted skipped.
        if isinstance(node, Mapping):
            return {k: skeleton(v, names + (str(k),)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(skeleton(v, names + (str(i),)) for i, v in enumerate(node))
        want = needed.get(_norm(names))
        return ocp.PLACEHOLDER if want is None else want

    item_tree = skeleton(tree)
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=sharding, dtype=s.dtype)
        if isinstance(s, jax.ShapeDtypeStruct) else s,
        item_tree,
    )
    restored = ocp.PyTreeCheckpointer().restore(
        directory, args=ocp.args.PyTreeRestore(item_tree, restore_args=restore_args)
    )
    flat = {_norm(k): v for k, v in ocp.tree.to_flat_dict(restored).items()}
    filled = [
        jax.tree_util.tree_unflatten(treedef, [flat[prefix + _names(p)] for p, _ in leaves])
        for leaves, treedef in flattened
    ]
    return rebuild(filled)


def load_orbax_teachers(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    target: Any,
    *,
    step: int | None = None,
    item: str | None = None,
    subtree: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> Any:
    """Read teachers saved by your own orbax code, for distillation (see the module doc).

    Args:
      paths: one checkpoint directory, or a list of K directories of one architecture
        (stacked: leaves `[K, ...]`, ready for `make_stacked_apply`).
      target: what to read: a pytree of arrays / `jax.ShapeDtypeStruct`s in the saved
        layout (Linen params or variables), or an `nnx.Module` (abstract or concrete).
      step: for a CheckpointManager directory, the step (default: the newest).
      item: for a CheckpointManager directory with several items, the one to read.
      subtree: where in the saved tree the target is (``"params"``, ``"model.params"``),
        when it is not found unambiguously by itself.
      sharding: where to place every array (default: the first local device).

    Returns:
      The target's layout filled from the checkpoint(s), cast to the target's dtypes; for an
      NNX target, its variables `{"params", "model_state"}` (`model_variables`: the
      `teacher_params` of `mtkd_jax.models.as_model(target)`). Stacked over K for a list.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: no orbax checkpoint at a path, an ambiguous step / item / subtree, or a
        layout that does not match the target (naming the path, what is missing or of
        another shape, and what the checkpoint holds).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp
      >>> from mtkd_jax.teachers import load_orbax_teachers
      >>> paths = [tempfile.mkdtemp() + f"/t{k}" for k in range(2)]
      >>> with ocp.StandardCheckpointer() as ckptr:
      ...     for k, path in enumerate(paths):
      ...         ckptr.save(path, {"w": jnp.full((3, 2), k, jnp.float32)})
      >>> like = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
      >>> load_orbax_teachers(paths, like)["w"][:, 0, 0].tolist()
      [0.0, 1.0]
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(paths, str | os.PathLike):
        return _read_one(paths, target, step, item, subtree, sharding)
    paths = list(paths)
    if not paths:
        raise ValueError("`paths` is empty: give one checkpoint directory per teacher.")
    return stack_params([_read_one(p, target, step, item, subtree, sharding) for p in paths])
