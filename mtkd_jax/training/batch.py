"""The batch a step reads, and its checks: shapes at trace time, values on the host.

A batch is a dict::

    {"x": [B, ...], "y": [B] int (optional), "label_mask": [B] (optional, 1 = labeled),
     "teacher_logits": [K, B, C] (optional, precomputed), "index": [B], "view": [B]}

or, for teachers read from a top-k cache without expanding them, "teacher_top_k": the
3-tuple `(log_probs [K, B, k], classes [K, B, k], log_rest [K, B])` in place of
"teacher_logits" (`mtkd_jax.objective.top_k_slots`).

A sequence batch adds a token axis L: "y" `[B, L]`, "mask" `[B, L]` (1 = a real token,
0 = padding, counted in no loss, weight or metric), "teacher_logits" `[K, B, L, V]`, and
the models' logits are `[B, L, V]`; "label_mask" may then be `[B]` or `[B, L]`. A
classification batch is the L-less case of the same code. "x" may be a dict of `[B, ...]`
arrays (one B): packed token rows are ``{"tokens": [B, L], "segment_ids": [B, L]}``
(`mtkd_jax.models.transformer`), whose segment ids `check_batch` checks are non-decreasing.

`batch_parts` checks what is known while tracing (keys, shapes, dtypes, B >= 1); it runs
inside every step. `check_batch` checks what only concrete values tell (labels in range,
finite teacher logits, a valid mask); `loop.fit`, `evaluation.evaluate` and
`parallel.data_parallel_step` call it on the host before a batch enters the compiled step,
so the check costs the step nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.precision import at_least_float32
from mtkd_jax.core.reduce import combine_masks
from mtkd_jax.objective.top_k_slots import check_top_k_inputs

__all__ = ["BatchParts", "batch_parts", "check_batch", "teacher_logits_of"]

_LAYOUT = (
    "{'x': [B, ...], 'y': [B] int labels (optional), 'label_mask': [B] (optional), "
    "'teacher_logits': [K, B, C] (optional)}; sequences: 'y' [B, L], 'mask' [B, L], "
    "'teacher_logits' [K, B, L, V]"
)


class BatchParts(NamedTuple):
    """The parts of a batch a step uses: `x` `[B, ...]`, `labels` `[B]` (`[B, L]`) or None,
    `label_mask` `[B]` (or `[B, L]`) or None, `size` B, `mask` `[B, L]` padding mask or None.
    """

    x: jax.Array
    labels: jax.Array | None
    label_mask: jax.Array | None
    size: int
    mask: jax.Array | None = None

    @property
    def lead(self) -> tuple[int, ...] | None:
        """The shape of the predictions' leading axes: `(B,)`, `(B, L)` for a sequence
        batch, or None when the batch does not say (no labels and no mask)."""
        if self.labels is not None:
            return tuple(jnp.shape(self.labels))
        if self.mask is not None:
            return tuple(jnp.shape(self.mask))
        return None

    @property
    def hard_mask(self):
        """Where a labeled term counts: `mask * label_mask` (`reduce.combine_masks`)."""
        return combine_masks(self.mask, self.label_mask)


def batch_parts(batch) -> BatchParts:
    """Check a batch's structure and shapes (trace-time facts only) and return its parts.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.training.batch import batch_parts
      >>> batch_parts({"x": np.zeros((2, 3)), "y": np.array([0, 1])}).size
      2
    """
    if not isinstance(batch, dict) or "x" not in batch:
        keys = f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""
        raise ValueError(f"`batch` must be a dict {_LAYOUT}; got {type(batch).__name__}{keys}.")
    x = batch["x"]
    b = _checks.batch_size(x, "batch['x']")
    if b == 0:
        raise ValueError(
            f"`batch['x']` is empty (shape {_checks.shapes(x)}): a batch needs at least one "
            "example."
        )
    token_mask = batch.get("mask")
    if token_mask is not None:
        shape = tuple(jnp.shape(token_mask))
        if len(shape) < 2 or shape[0] != b:
            raise ValueError(
                f"`batch['mask']` (the padding mask of a sequence batch) must have shape "
                f"[B, L] with B={b} (the batch size of 'x'), got {shape}."
            )
        dtype = jnp.result_type(token_mask)
        if not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_):
            raise TypeError(f"`batch['mask']` must be numeric or boolean, got dtype {dtype}.")
    labels = batch.get("y")
    if labels is not None:
        if token_mask is not None:
            lead = tuple(jnp.shape(token_mask))
            if jnp.ndim(labels) == len(lead) and tuple(jnp.shape(labels)) != lead:
                raise ValueError(
                    f"`batch['mask']` has shape {lead} but `batch['y']` "
                    f"{tuple(jnp.shape(labels))}: the padding mask and the token labels must "
                    "have one shape [B, L], one mask entry per label."
                )
        elif jnp.ndim(labels) >= 2 and jnp.shape(labels)[0] == b:
            lead = tuple(jnp.shape(labels))  # token labels [B, L] without padding
        else:
            lead = (b,)
        _checks.check_labels(labels, "batch['y']", lead)
    mask = batch.get("label_mask")
    if mask is not None:
        lead = (b,) if labels is None else tuple(jnp.shape(labels))
        if tuple(jnp.shape(mask)) not in {(b,), lead}:
            want = f"[B]=({b},)" + ("" if lead == (b,) else f" or [B, L]={lead}")
            raise ValueError(
                f"`batch['label_mask']` must have shape {want}, got {jnp.shape(mask)}."
            )
        if labels is None:
            raise ValueError("`batch['label_mask']` is given but `batch['y']` (the labels) is not.")
    tl = batch.get("teacher_logits")
    if tl is not None:
        lead = BatchParts(x, labels, mask, b, token_mask).lead or (b,)
        _check_teacher_logits(tl, lead, "`batch['teacher_logits']`")
    if token_mask is None and labels is not None and jnp.ndim(labels) >= 2:
        token_mask = jnp.ones(jnp.shape(labels), jnp.float32)  # token labels, no padding
    return BatchParts(x, labels, mask, b, token_mask)


def _check_teacher_logits(z, lead: tuple, name: str) -> None:
    """`z` must be `[K, *lead, C]` floats, `lead` the batch's `(B,)` or `(B, L)`."""
    if jnp.ndim(z) != len(lead) + 2 or tuple(jnp.shape(z)[1:-1]) != tuple(lead):
        layout, axes, lead_from = (
            ("[K, B, C]", f"B={lead[0]}", "the batch size of 'x'") if len(lead) == 1
            else ("[K, B, L, V]", f"[B, L]={tuple(lead)}", "the shape of 'y' / 'mask'"))
        raise ValueError(f"{name} must have shape {layout} with {axes} ({lead_from}), got "
                         f"{jnp.shape(z)}.")
    _checks.check_float(z, name.strip("`"))


def teacher_logits_of(
    batch: dict, x, teacher_apply, teacher_params, *, required: bool = True, lead=None
):
    """The teachers' logits `[K, B, C]` (`[K, B, L, V]`) for a batch, frozen
    (`stop_gradient`), >= float32.

    Run online as `teacher_apply(teacher_params, x)`, or, when `teacher_apply` is None, read
    from `batch["teacher_logits"]` (precomputed, e.g. from `mtkd_jax.cache`). A batch with
    `batch["teacher_top_k"]` instead (`mtkd_jax.cache.with_cached_top_k`: the 3-tuple
    `(log_probs [K, ..., k], classes [K, ..., k], log_rest [K, ...])`) returns that tuple,
    checked and frozen, for the steps' slot-space loss (`mtkd_jax.objective.top_k_slots`).

    Args:
      batch: the batch (for `"teacher_logits"`).
      x: `[B, ...]` the inputs the teachers see (the batch's, possibly augmented).
      teacher_apply: `(teacher_params, x) -> [K, B, C]`, or None.
      teacher_params: the teachers' params (needed with `teacher_apply`).
      required: raise when there are no teacher logits; otherwise return None.
      lead: the batch's leading axes (`BatchParts.lead`: `(B,)` or `(B, L)`); None for `(B,)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.training.batch import teacher_logits_of
      >>> x = jnp.ones((2, 3))
      >>> teacher_logits_of({"x": x}, x, lambda tp, x: jnp.stack([x @ w for w in tp]),
      ...                   (jnp.eye(3), jnp.eye(3))).shape
      (2, 2, 3)
    """
    b = _checks.batch_size(x)
    if teacher_apply is None:
        if "teacher_logits" not in batch and "teacher_top_k" in batch:
            top = check_top_k_inputs(batch["teacher_top_k"], (b,) if lead is None else lead)
            return jax.lax.stop_gradient(top)
        if "teacher_logits" not in batch:
            if not required:
                return None
            raise ValueError(
                "`teacher_apply` is None, so the batch must hold precomputed "
                f"'teacher_logits' [K, B, C] (or 'teacher_top_k' entries); it has keys "
                f"{sorted(batch)}."
            )
        z = batch["teacher_logits"]
    else:
        if teacher_params is None:
            raise ValueError(
                "the teachers run online, so `teacher_params` is needed (the stacked teacher "
                "params [K, ...], or a tuple of K params): e.g. "
                "`step(state, batch, key, teacher_params=tp)`."
            )
        z = teacher_apply(teacher_params, x)
    _check_teacher_logits(z, (b,) if lead is None else tuple(lead), "teacher logits")
    # bfloat16 teachers: softmaxes, weights and targets in float32 (mtkd_jax.core.precision).
    return jax.lax.stop_gradient(at_least_float32(z))


def _host(value) -> np.ndarray | None:
    """This process's values of an array as NumPy, or None for a traced value."""
    if _checks.is_traced(value):
        return None
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.concatenate([np.asarray(s.data).ravel() for s in value.addressable_shards])
    return np.asarray(value)


def check_batch(batch: dict, *, num_classes: int | None = None) -> int:
    """Check a concrete batch on the host before it enters a compiled step.

    Shapes always (`batch_parts`); then, for concrete values: labels >= 0 (and < C when
    `num_classes` is given, or C read off `batch["teacher_logits"]`) wherever `label_mask`
    is 1, `label_mask` finite and >= 0, a sequence `mask` of 0s and 1s with at least one 1,
    and `teacher_logits` finite with C classes. Inside `jax.jit` the values cannot be read, and an
    out-of-range label would silently give a NaN or a wrong loss, so training loops call this
    on the host batch. Arrays that span several processes are checked on this process's part.

    Args:
      batch: see the module docstring.
      num_classes: C, to check labels in `[0, C)` and the class axis of teacher logits.

    Returns:
      The batch size B.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.training.batch import check_batch
      >>> check_batch({"x": np.zeros((2, 3)), "y": np.array([0, 1])}, num_classes=2)
      2
      >>> check_batch({"x": np.zeros((2, 3)), "y": np.array([0, 2])}, num_classes=2)
      Traceback (most recent call last):
      ...
      ValueError: `batch['y']` labels must be in [0, 2) (num_classes); found [2]. ...
    """
    if num_classes is not None:
        _checks.check_int(num_classes, "num_classes")
    parts = batch_parts(batch)
    tl = batch.get("teacher_logits")
    source = "num_classes"
    if num_classes is None and tl is not None:
        num_classes, source = int(jnp.shape(tl)[-1]), "the classes of batch['teacher_logits']"
    mask = None if parts.label_mask is None else _host(parts.label_mask)
    if mask is not None and not np.all(np.isfinite(mask) & (mask >= 0)):
        raise ValueError(
            "`batch['label_mask']` must be finite and >= 0 (1 = labeled, 0 = unlabeled); got "
            f"values {np.unique(mask)[:8].tolist()}."
        )
    token_mask = None if parts.mask is None else _host(parts.mask)
    if token_mask is not None:
        token_mask = token_mask.astype(np.float64)
        if not np.all((token_mask == 0) | (token_mask == 1)):
            raise ValueError(
                "`batch['mask']` must hold 0 (padding) or 1 (token); got values "
                f"{np.unique(token_mask)[:8].tolist()}. Other values would weight the tokens' "
                "losses; packed sequences' segment ids are not a padding mask (use "
                "`segment_ids > 0`)."
            )
        if not np.any(token_mask > 0):
            raise ValueError(
                f"`batch['mask']` (shape {token_mask.shape}) is 0 everywhere: an all-padding "
                "batch has no token to learn from or to evaluate. Drop it from the stream."
            )
    if isinstance(parts.x, dict) and "segment_ids" in parts.x:
        ids = _host(parts.x["segment_ids"])
        if ids is not None:
            pad = parts.x.get("mask", parts.mask)
            _checks.check_segment_ids(ids, None if pad is None else _host(pad),
                                      name="batch['x']['segment_ids']")
    labels = None if parts.labels is None else _host(parts.labels)
    if labels is not None:
        keep = np.ones(labels.shape, bool)
        if mask is not None and labels.shape[: mask.ndim] == mask.shape:
            keep &= mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim)) > 0
        if token_mask is not None and token_mask.shape == labels.shape:
            keep &= token_mask > 0
        labels = labels[keep]
        high = np.inf if num_classes is None else num_classes
        bad = (labels < 0) | (labels >= high)
        if bad.any():
            span = "[0, C)" if num_classes is None else f"[0, {num_classes}) ({source})"
            raise ValueError(
                f"`batch['y']` labels must be in {span}; found "
                f"{np.unique(labels[bad]).tolist()[:10]}. Mark examples without a label with "
                "batch['label_mask'] = 0 (padding tokens with batch['mask'] = 0) instead."
            )
    if tl is not None:
        if num_classes is not None and jnp.shape(tl)[-1] != num_classes:
            raise ValueError(
                f"`batch['teacher_logits']` has {jnp.shape(tl)[-1]} classes (shape "
                f"{jnp.shape(tl)}) but num_classes={num_classes}."
            )
        values = _host(tl)
        if values is not None and not np.all(np.isfinite(values)):
            raise ValueError(
                f"`batch['teacher_logits']` holds {int(np.sum(~np.isfinite(values)))} NaN/inf "
                "values: the teachers (or the cache they were read from) produced non-finite "
                "logits."
            )
    return parts.size
