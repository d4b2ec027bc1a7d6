"""The identity of a parameter pytree (`params_fingerprint`) and how two of them differ.

A checkpoint stores the fingerprint of the teachers its student was trained with;
`Checkpointer.restore` compares it with the given one (`fingerprint_differences`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["fingerprint_differences", "params_fingerprint"]


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


def fingerprint_differences(saved: Any, current: Any) -> list[str]:
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
