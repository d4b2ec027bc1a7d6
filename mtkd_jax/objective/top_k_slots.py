r"""Distilling from top-k teacher entries without expanding them to the vocabulary: slots.

A top-k cache stores, per teacher and position, the k largest log-probabilities at T = 1,
their classes and the log of the mass outside them (`mtkd_jax.cache.topk`). Expanded to the
vocabulary (``fill="uniform"``), the student learns a flat tail: each of the V - k other
tokens gets :math:`r / (V - k)`, where the teacher's real tail is Zipfian, and the soft
loss spends its gradient pulling every rare token's probability toward that constant.
Expanding also costs a `[K, B, c, V]` array per chunk.

`top_k_slots` instead carries the student and the teachers into a common space of
:math:`S = K k + 2` **slots** per position (:math:`K k + 1` without labels):

* one slot per stored class of every teacher (the union U of their top-k classes; a class
  stored by several teachers keeps its first slot, the later ones are empty),
* one slot for the label (empty when the label is already in U),
* one **rest** slot for every class outside U, held as a single bucket.

Teacher k's probability of a slot is its stored probability when it stored the class, and
:math:`f_k = r_k / (V - k)` (its tail spread evenly, as ``fill="uniform"``) when another
teacher did; its rest slot holds :math:`m f_k`, m = V - |U| the classes in the bucket, so
each teacher's slot distribution sums to 1. The student's slot logits are its logits of the
classes in U and :math:`\log \sum_{c \notin U} e^{z_c}` for the rest slot, so that a softmax
over the slots is the student's distribution with the bucket's classes summed. Empty slots
get `EMPTY_SLOT` on both sides (probability 0 exactly).

The distillation loss on slots (`distill_sums` of the slot logits) is then, per position,

.. math::
   (1-\alpha)\,\Big[\sum_{u \in U} t_u \log\frac{t_u}{q_u} + t_R \log\frac{t_R}{q_R}\Big]
   + \alpha\,(-\log q_y),\qquad t = \sum_k w_k\, p_k^{slots},

the KL between the fused target and the student **with the classes outside U merged**
(:math:`q_R = \sum_{c \notin U} q_c`), and the exact cross-entropy of the label (its slot
always exists). The student matches each teacher's stored probabilities and its total tail
mass, and the shape of its tail is left to the labels. When U covers the vocabulary the
rest slot is empty and this is exactly the loss of the expanded entries. Teacher weightings
see the teachers' slot distributions (``confidence`` and ``posterior`` read the label's
probability: exact when the label is stored, e.g. `build_cache(keep_labels=True)`; the
``entropy`` weighting sees the entropy of the slot distribution, the rest bucket counted as
one class). The metrics are slot-space too: ``accuracy`` and ``agreement`` count the rest
bucket as one class, and ``teacher_divergence`` compares the teachers' slot distributions.

Only T = 1 is defined here: tempering the bucket is not tempering its classes.

Cost per position: the student's logsumexp over V (which the label's cross-entropy needs
anyway), a gather of S logits, and a `[V]` integer table that finds each class's first slot
(a scatter-min of the S slot indices); nothing of size `K * V`, nothing quadratic in K k.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["EMPTY_SLOT", "Slots", "top_k_slots", "check_top_k_inputs"]

EMPTY_SLOT = -1.0e9
"""Logit of an empty slot (a duplicate class, or the rest bucket when U covers the
vocabulary), on the student's and every teacher's side: probability 0 exactly in float32,
finite so that no loss or gradient meets an infinity."""


class Slots(NamedTuple):
    """Student and teachers in the slot space of one block of positions.

    Attributes:
      student: `[..., S]` student slot logits (differentiable).
      teachers: `[K, ..., S]` teacher slot log-probabilities (each row a log-distribution).
      labels: `[...]` the label's slot index, or None without labels.
    """

    student: jax.Array
    teachers: jax.Array
    labels: jax.Array | None


def check_top_k_inputs(top, lead: tuple) -> tuple:
    """`top` as three arrays `(log_probs [K, *lead, k], classes [K, *lead, k], log_rest
    [K, *lead])`; ValueError/TypeError naming what is wrong otherwise."""
    if not isinstance(top, tuple) or len(top) != 3:
        raise TypeError(
            "teacher top-k entries must be a 3-tuple (log_probs [K, ..., k], classes "
            f"[K, ..., k], log_rest [K, ...]) such as `mtkd_jax.cache.TopK`, got "
            f"{type(top).__name__}."
        )
    log_probs, classes, log_rest = top
    ps, cs, rs = jnp.shape(log_probs), jnp.shape(classes), jnp.shape(log_rest)
    lead = tuple(lead)
    if (len(ps) != len(lead) + 2 or ps != cs or tuple(ps[1:-1]) != lead
            or rs != ps[:-1]):
        raise ValueError(
            f"teacher top-k entries must be log_probs and classes [K, *{lead}, k] and log_rest "
            f"[K, *{lead}] (the batch's positions {lead}); got log_probs {ps}, classes {cs}, "
            f"log_rest {rs}."
        )
    if not jnp.issubdtype(jnp.result_type(classes), jnp.integer):
        raise TypeError(f"top-k `classes` must be integers, got {jnp.result_type(classes)}.")
    if not jnp.issubdtype(jnp.result_type(log_probs), jnp.floating):
        raise TypeError(f"top-k `log_probs` must be floats, got {jnp.result_type(log_probs)}.")
    return log_probs, classes, log_rest


def top_k_slots(
    student_logits: jax.Array,
    log_probs: jax.Array,
    classes: jax.Array,
    log_rest: jax.Array,
    labels: jax.Array | None = None,
) -> Slots:
    r"""Student logits and teachers' top-k entries -> the slot space (module docstring).

    Args:
      student_logits: `[..., V]` (e.g. `[B, c, V]`, one chunk of a sequence batch).
      log_probs: `[K, ..., k]` teacher log-probabilities at T = 1 (any float dtype).
      classes: `[K, ..., k]` their classes in `[0, V)`, distinct per teacher and position.
      log_rest: `[K, ...]` log of each teacher's probability outside its k classes.
      labels: optional `[...]` int labels (values outside `[0, V)`, e.g. padding, are
        clipped into it; mask them out of the loss).

    Returns:
      `Slots(student [..., S], teachers [K, ..., S], labels [...] or None)`,
      S = K k + 2 with labels, K k + 1 without; float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.objective.top_k_slots import top_k_slots
      >>> lp = jnp.log(jnp.array([[[0.5, 0.3]], [[0.6, 0.2]]]))        # K=2, B=1, k=2
      >>> cls = jnp.array([[[0, 1]], [[0, 2]]])
      >>> rest = jnp.log(jnp.array([[0.2], [0.2]]))                     # V=4: 2 others each
      >>> s = top_k_slots(jnp.zeros((1, 4)), lp, cls, rest)
      >>> [round(v, 2) for v in jax.nn.softmax(s.teachers[1, 0]).tolist()]
      [0.6, 0.1, 0.0, 0.2, 0.1]
      >>> [round(v, 2) for v in jax.nn.softmax(s.student[0]).tolist()]
      [0.25, 0.25, 0.0, 0.25, 0.25]
    """
    z = jnp.asarray(student_logits).astype(jnp.float32)
    v = z.shape[-1]
    log_probs = jnp.asarray(log_probs).astype(jnp.float32)
    classes = jnp.asarray(classes).astype(jnp.int32)
    log_rest = jnp.asarray(log_rest).astype(jnp.float32)
    k_teachers, k = classes.shape[0], classes.shape[-1]
    lead = z.shape[:-1]
    if classes.shape[1:-1] != lead or log_probs.shape != classes.shape:
        raise ValueError(
            f"top-k entries [K, ..., k] must match the student's positions {lead}: got "
            f"log_probs {log_probs.shape}, classes {classes.shape}."
        )
    if k > v:
        raise ValueError(f"top-k entries hold k={k} classes but the student predicts V={v}.")
    union = jnp.moveaxis(classes, 0, -2).reshape(lead + (k_teachers * k,))  # [..., K k]
    if labels is not None:
        y = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, v - 1)
        union = jnp.concatenate([union, y[..., None]], axis=-1)  # [..., U]
    n = union.shape[-1]
    # Each class's first slot, by a scatter-min into a [..., V] table: O(V + K k) per position
    # (comparing every slot with every other is O((K k)^2), which dominated at K = 8).
    flat = union.reshape(-1, n)
    rows = jnp.arange(flat.shape[0])[:, None]
    slot_ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), flat.shape)
    first = jnp.full((flat.shape[0], v), n, jnp.int32).at[rows, flat].min(slot_ids)
    canon = jnp.take_along_axis(first, flat, axis=-1).reshape(union.shape)  # [..., U]
    empty = canon != jnp.arange(n)  # a later copy of a class
    member = (first < n).reshape(z.shape)  # [..., V]: the classes in U
    held = n - jnp.sum(empty, axis=-1)  # [...] |U|
    in_bucket = (v - held).astype(jnp.float32)  # m

    # Teachers: the even share of the tail everywhere, then each stored log-probability
    # written at its class's first slot.
    log_fill = (log_rest - math.log(v - k)) if v > k else jnp.full_like(log_rest, EMPTY_SLOT)
    t_slots = jnp.broadcast_to(log_fill[..., None], log_fill.shape + (n,))
    own_slots = jnp.moveaxis(canon[..., : k_teachers * k].reshape(lead + (k_teachers, k)),
                             -2, 0)  # [K, ..., k]
    t_slots = jnp.put_along_axis(t_slots, own_slots, log_probs, axis=-1, inplace=False)
    t_slots = jnp.where(empty[None], EMPTY_SLOT, t_slots)
    t_rest = jnp.where(in_bucket > 0, log_fill + jnp.log(jnp.maximum(in_bucket, 1.0)),
                       EMPTY_SLOT)
    teachers = jnp.concatenate([t_slots, t_rest[..., None]], axis=-1)

    # Student: its logits of U, and the log-sum-exp of the classes outside U.
    s_slots = jnp.where(empty, EMPTY_SLOT, jnp.take_along_axis(z, union, axis=-1))
    s_rest = jax.nn.logsumexp(jnp.where(member, EMPTY_SLOT, z), axis=-1)
    s_rest = jnp.where(in_bucket > 0, s_rest, EMPTY_SLOT)
    student = jnp.concatenate([s_slots, s_rest[..., None]], axis=-1)

    slot_labels = None if labels is None else canon[..., -1].astype(jnp.int32)
    return Slots(student, teachers, slot_labels)
