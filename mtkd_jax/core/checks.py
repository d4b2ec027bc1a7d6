"""Trace-time argument checks shared by the public functions.

Everything here looks only at static facts (shapes, dtypes) and at values that are concrete
(Python numbers, NumPy arrays, arrays outside a trace), so it runs once per trace under
`jax.jit` and never touches traced values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_float(x, name: str) -> None:
    """Raise TypeError unless `x` has a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array (logits or probabilities), "
            f"got dtype {jnp.result_type(x)}."
        )


def is_traced(x) -> bool:
    """True for a value only known at run time (inside `jax.jit`, `grad`, `vmap`, ...)."""
    return isinstance(x, jax.core.Tracer)


def check_temperature(temperature, name: str = "temperature") -> None:
    """Raise for a concrete temperature that is not a finite number > 0; traced ones pass.

    Concrete means a Python number, a NumPy value or an array outside a trace; a traced
    temperature cannot be read without a host sync, so it is the caller's responsibility.
    """
    if is_traced(temperature):
        return
    t = np.asarray(temperature)
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise TypeError(f"`{name}` must be a real number > 0, got {temperature!r}.")
    if not np.all((t > 0) & np.isfinite(t)):
        raise ValueError(f"`{name}` must be a finite number > 0, got {temperature}.")


def check_unit_interval(value, name: str) -> None:
    """Raise ValueError for a concrete value outside [0, 1] (or NaN); traced values pass."""
    if is_traced(value):
        return
    v = np.asarray(value, dtype=np.float64)
    if not np.all((v >= 0) & (v <= 1)):
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")


def is_concrete_zero(value) -> bool:
    """True for a concrete value that is exactly 0 everywhere (e.g. `alpha=0`: no hard term)."""
    return not is_traced(value) and not np.any(np.asarray(value))


def check_int(value, name: str, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """`value` as an int; ValueError unless it is an int >= `minimum` (or None when allowed).

    Example:
      >>> from mtkd_jax.core.checks import check_int
      >>> check_int(3, "num_epochs")
      3
      >>> check_int(0, "num_epochs")
      Traceback (most recent call last):
      ...
      ValueError: `num_epochs` must be an int >= 1, got 0.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_weight_values(weights, name: str) -> None:
    """Concrete teacher weights `[K, ...]`: finite, >= 0 and summing to 1 over K (tolerance
    1e-3); traced weights (computed inside `jax.jit`) pass through unchecked."""
    if is_traced(weights):
        return
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"`{name}` must be finite; it holds NaN or inf: {w.ravel()[:8]}...")
    if np.any(w < 0):
        raise ValueError(f"`{name}` must be non-negative; its minimum is {w.min()}.")
    total = w.sum(axis=0)
    if not np.allclose(total, 1.0, atol=1e-3):
        worst = total.ravel()[np.argmax(np.abs(total.ravel() - 1.0))]
        raise ValueError(
            f"`{name}` must sum to 1 over the teacher axis (axis 0, shape {w.shape}); a sum is "
            f"{worst}. Normalise them (e.g. with `mtkd_jax.weighting.static`)."
        )


def check_ndim(x, name: str, min_ndim: int, layout: str) -> None:
    if jnp.ndim(x) < min_ndim:
        raise ValueError(
            f"`{name}` must have at least {min_ndim} dims ({layout}), got shape {jnp.shape(x)}."
        )


def check_teachers(probs, name: str, *, min_teachers: int = 1) -> int:
    """Check a teacher-first array `[K, ..., C]` and return K."""
    check_float(probs, name)
    check_ndim(probs, name, 2, "[K, ..., C], teacher axis first")
    k = jnp.shape(probs)[0]
    if k < min_teachers:
        raise ValueError(
            f"`{name}` holds {k} teacher(s) on its leading axis; this needs at least "
            f"{min_teachers} (shape [K, ..., C])."
        )
    return k


def check_weights(weights, name: str, probs_shape: tuple[int, ...], probs_name: str) -> None:
    """Weights are `[K]` or `[K, ...]` matching the leading dims of probs `[K, ..., C]`."""
    check_float(weights, name)
    w_shape = jnp.shape(weights)
    if len(w_shape) == 0 or w_shape[0] != probs_shape[0]:
        raise ValueError(
            f"`{name}` must have {probs_shape[0]} teachers on its leading axis to match "
            f"`{probs_name}` of shape {probs_shape}; got shape {w_shape}."
        )
    lead = probs_shape[:-1]
    if len(w_shape) > 1 and w_shape != lead:
        raise ValueError(
            f"`{name}` must have shape [K]={lead[:1]} or [K, ...]={lead} to match "
            f"`{probs_name}` of shape {probs_shape}; got {w_shape}."
        )


def check_same_classes(a_shape, b_shape, a_name: str, b_name: str) -> None:
    if a_shape[-1] != b_shape[-1]:
        raise ValueError(
            f"`{a_name}` has {a_shape[-1]} classes (last axis of {tuple(a_shape)}) but "
            f"`{b_name}` has {b_shape[-1]} (last axis of {tuple(b_shape)}); they must match."
        )


def check_labels(labels, name: str, batch_shape: tuple[int, ...]) -> None:
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(
            f"`{name}` must be integer class indices, got dtype {jnp.result_type(labels)}."
        )
    if tuple(jnp.shape(labels)) != tuple(batch_shape):
        raise ValueError(
            f"`{name}` must have shape {tuple(batch_shape)} (the batch dims of the logits), "
            f"got {tuple(jnp.shape(labels))}."
        )


def shapes(x):
    """The shape of an array, or the shapes of a dict of arrays (for messages)."""
    return jax.tree.map(jnp.shape, x) if isinstance(x, dict) else jnp.shape(x)


def batch_size(x, name: str = "x") -> int:
    """B, the leading axis of `x`: an array `[B, ...]` or a dict of them (e.g. packed token
    rows ``{"tokens": [B, L], "segment_ids": [B, L]}``), every leaf with that B.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax._checks import batch_size
      >>> batch_size({"tokens": np.zeros((2, 5), int), "segment_ids": np.zeros((2, 5), int)})
      2
    """
    leaves = jax.tree.leaves(x) if isinstance(x, dict) else [x]
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves) or len(
            {jnp.shape(leaf)[0] for leaf in leaves}) != 1:
        raise ValueError(
            f"`{name}` must be an array with a leading batch axis [B, ...] (or a dict of such "
            f"arrays with one B), got shape {shapes(x)}."
        )
    return jnp.shape(leaves[0])[0]


def check_segment_ids(segment_ids, mask=None, *, name: str = "segment_ids") -> None:
    """Raise ValueError when concrete segment ids decrease along a row (traced ids pass).

    A packed row holds its documents one after another, so its segment ids are
    non-decreasing; ids that go back (`[1, 1, 2, 1]`) would let a token attend to another
    document. Only real tokens count (`mask` > 0, when given): padding may carry any id.

    Args:
      segment_ids: `[B, L]` int.
      mask: optional `[B, L]`, 1 = token, 0 = padding.
      name: the argument's name in the message.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax._checks import check_segment_ids
      >>> check_segment_ids(np.array([[0, 0, 1], [3, 3, 3]]))
      >>> check_segment_ids(np.array([[0, 1, 0]]))
      Traceback (most recent call last):
      ...
      ValueError: `segment_ids` must be non-decreasing along each row ... row 0 has id 0 at ...
    """
    if is_traced(segment_ids) or (mask is not None and is_traced(mask)):
        return
    ids = np.asarray(segment_ids)
    if ids.ndim != 2:
        raise ValueError(f"`{name}` must have shape [B, L], got {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"`{name}` must be integers, got dtype {ids.dtype}.")
    keep = np.ones(ids.shape, bool) if mask is None else np.asarray(mask) > 0
    # The largest id of a real token so far; a real token below it breaks the order.
    seen = np.maximum.accumulate(np.where(keep, ids, np.iinfo(ids.dtype).min), axis=-1)
    bad = keep[:, 1:] & (ids[:, 1:] < seen[:, :-1])
    if bad.any():
        row, at = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"`{name}` must be non-decreasing along each row (packed documents one after "
            f"another); row {row} has id {ids[row, at + 1]} at position {at + 1} after id "
            f"{seen[row, at]}."
        )
