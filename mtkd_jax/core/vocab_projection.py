r"""A teacher's next-token distribution carried onto the student's vocabulary.

Two tokenizers share many tokens (the same bytes under different ids and markers) and differ
on the rest. A `VocabProjection` is the sparse, precomputed map between them, built on the
host from the tokens' byte strings (`mtkd_jax.data.alignment.build_projection`):

* `exact` int32 `[V_t]`: the student token with the same bytes as teacher token t, or -1;
* `prefix` int32 `[V_t]`: the student token whose bytes are the longest prefix of teacher
  token t's (equal to `exact` where that exists), or -1;
* `student_matched` bool `[V_s]`: student tokens that some teacher token matches exactly.

What happens to the teacher's mass on its **unmatched** tokens is a method, chosen by name
(`PROJECTION_METHODS`):

* ``"prefix"`` (the prefix mapping of token aligners such as NeMo-RL's / X-Token's): each
  teacher token's mass goes to its `prefix` student token, the first student token of its
  text, :math:`q_s = \sum_{t:\,\pi(t)=s} p_t \,/\, \sum_{t:\,\pi(t)\ge 0} p_t`. The fused
  target is then a full distribution over the student's vocabulary and the usual KL applies.
* ``"uld"`` (Universal Logit Distillation, Boizard et al. 2024, on the unmatched part, as
  TRL's GOLD): the target is the teacher's distribution over its exactly matched tokens,
  :math:`q_s = \sum_{t:\,e(t)=s} p_t \,/\, \sum_{t:\,e(t)\ge 0} p_t` (compared by KL), and
  the unmatched parts are compared by the sorted-probability L1 of `uld_distance`,
  :math:`\sum_i |\mathrm{sort}_\downarrow(p \odot 1[e<0])_i -
  \mathrm{sort}_\downarrow(\mathrm{softmax}(z/T) \odot 1[\neg m])_i|` (the shorter padded with
  zeros), which needs no correspondence between the two unmatched sets.

Everything here is jit-safe: the maps are arrays (shapes static). With concrete maps (the
usual case: built once on the host) the projection is a few static gathers along the
vocabulary axis, one per fan-in (how many teacher tokens map onto one student token), planned
on the host at trace time; `project_logits` works in log space (a log-sum-exp per student
token, no softmax and no log of the projected probabilities). With maps passed as traced
arguments it is a scatter-add. Either way `[K?, B, L, V_t] -> [B, L, V_s]` costs a pass or two
over the teacher's distribution and never a `[V_t, V_s]` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.class_sets import UNKNOWN_LOGIT
from mtkd_jax.core.divergence import softmax_t

__all__ = ["PROJECTION_METHODS", "VocabProjection", "check_projection", "is_identity",
           "project_logits", "project_probs", "uld_distance", "uld_from_top",
           "unmatched_top"]

PROJECTION_METHODS = ("prefix", "uld")
"""The named ways to handle the teacher's mass on tokens the student does not have."""


class VocabProjection(NamedTuple):
    """The sparse map from a teacher vocabulary (V_t) to the student's (V_s).

    Attributes:
      exact: int32 `[V_t]`, the student id with the same bytes, -1 where none.
      prefix: int32 `[V_t]`, the student id of the longest prefix of the bytes, -1 where none.
      student_matched: bool `[V_s]`, student ids that some `exact` entry points at.
    """

    exact: jax.Array
    prefix: jax.Array
    student_matched: jax.Array

    @classmethod
    def from_maps(cls, exact, prefix, *, student_vocab_size: int) -> VocabProjection:
        """Check the two maps (NumPy, on the host) and derive `student_matched`.

        Raises:
          ValueError: maps of different lengths, or ids outside `[-1, V_s)`.
        """
        exact, prefix = np.asarray(exact, np.int32), np.asarray(prefix, np.int32)
        if exact.ndim != 1 or exact.shape != prefix.shape:
            raise ValueError(f"`exact` and `prefix` must both be [V_t], got {exact.shape} "
                             f"and {prefix.shape}.")
        for name, m in (("exact", exact), ("prefix", prefix)):
            if m.size and (m.min() < -1 or m.max() >= student_vocab_size):
                raise ValueError(f"`{name}` holds ids outside [-1, {student_vocab_size}) "
                                 f"(`student_vocab_size`).")
        matched = np.zeros(student_vocab_size, bool)
        matched[exact[exact >= 0]] = True
        return cls(exact, prefix, matched)

    @property
    def teacher_vocab_size(self) -> int:
        return int(self.exact.shape[0])

    @property
    def student_vocab_size(self) -> int:
        return int(self.student_matched.shape[0])


def check_projection(projection: VocabProjection, teacher_vocab_size: int, *,
                     method: str | None = None) -> None:
    """Raise unless `projection` was built for a teacher vocabulary of this size (and the
    method is known)."""
    if not isinstance(projection, VocabProjection):
        raise TypeError(f"`projection` must be a VocabProjection, got "
                        f"{type(projection).__name__}.")
    if projection.teacher_vocab_size != teacher_vocab_size:
        raise ValueError(
            f"the projection was built for a teacher vocabulary of "
            f"{projection.teacher_vocab_size} tokens but the teacher's distribution has "
            f"{teacher_vocab_size}: build it from this teacher's tokenizer "
            "(`mtkd_jax.data.alignment.build_projection`)."
        )
    if method is not None and method not in PROJECTION_METHODS:
        raise ValueError(f"`method` must be one of {PROJECTION_METHODS}, got {method!r}.")


def is_identity(projection: VocabProjection) -> bool:
    """True when the maps are concrete and every token maps to itself (the teacher's
    tokenizer is the student's): the projection is then skipped, so such a teacher gives
    exactly the numbers of the shared-vocabulary path. False for traced maps."""
    if any(_checks.is_traced(a) for a in projection):
        return False
    exact = np.asarray(projection.exact)
    return (projection.teacher_vocab_size == projection.student_vocab_size
            and bool(np.array_equal(exact, np.arange(exact.size))))


def project_probs(probs: jax.Array, projection: VocabProjection, *,
                  method: str = "prefix") -> jax.Array:
    r"""Teacher probabilities `[..., V_t]` -> student-vocabulary probabilities `[..., V_s]`.

    ``"prefix"``: :math:`q_s = \sum_{t:\,\pi(t)=s} p_t / \sum_{t:\,\pi(t)\ge 0} p_t` with
    :math:`\pi` = `projection.prefix`. ``"uld"``: the same over the exact matches only,
    :math:`q_s = \sum_{t:\,e(t)=s} p_t / \sum_{t:\,e(t)\ge 0} p_t` (the unmatched mass goes
    to `uld_distance`). Where no mass maps at all, q is all zeros.

    Example:
      >>> import jax.numpy as jnp
      >>> proj = VocabProjection.from_maps([0, -1, 2], [0, 1, 2], student_vocab_size=3)
      >>> p = jnp.array([0.5, 0.25, 0.25])
      >>> project_probs(p, proj).tolist()
      [0.5, 0.25, 0.25]
      >>> [round(v, 4) for v in project_probs(p, proj, method="uld").tolist()]
      [0.6667, 0.0, 0.3333]
    """
    probs = jnp.asarray(probs)
    check_projection(projection, probs.shape[-1], method=method)
    target = projection.prefix if method == "prefix" else projection.exact
    keep = jnp.asarray(target) >= 0
    mass = jnp.where(keep, probs, 0.0)
    plan = _gather_plan(target, projection.student_vocab_size)
    if plan is not None:
        q = _by_plan(mass, plan, jnp.sum, 0.0)
    else:  # traced maps: a scatter-add over the vocabulary axis put first
        q = _scatter_rows(mass, jnp.asarray(target), keep, projection.student_vocab_size)
    total = jnp.sum(mass, axis=-1, keepdims=True)
    return jnp.where(total > 0, q / jnp.where(total > 0, total, 1.0), 0.0)


class _Plan(NamedTuple):
    """How a concrete many-to-one map `[V_t] -> [0, V_s) or -1` is carried out by gathers:
    the student tokens grouped by how many teacher tokens map onto each (fan-in f),
    `groups` = ((f, teacher ids `[m_f * f]`, row-major `[m_f, f]`), ...); the groups' results
    laid side by side, then `missing` columns for the student tokens nothing maps onto;
    `position[s]` = the column of student token s there."""

    groups: tuple
    missing: int
    position: np.ndarray


def _gather_plan(target, student_vocab_size: int) -> _Plan | None:
    """The `_Plan` of a concrete map (built on the host at trace time), None for a traced one."""
    if _checks.is_traced(target):
        return None
    target = np.asarray(target)
    kept = np.flatnonzero(target >= 0)
    order = kept[np.argsort(target[kept], kind="stable")]
    students, starts, counts = np.unique(target[order], return_index=True, return_counts=True)
    groups, columns = [], []
    for f in np.unique(counts):
        sel = counts == f
        ids = order[starts[sel][:, None] + np.arange(f)]  # [m_f, f]
        groups.append((int(f), ids.reshape(-1).astype(np.int32)))
        columns.append(students[sel])
    missing = np.setdiff1d(np.arange(student_vocab_size), np.concatenate(columns + [[]]))
    position = np.empty(student_vocab_size, np.int32)
    position[np.concatenate(columns + [missing]).astype(np.int64)] = np.arange(
        student_vocab_size, dtype=np.int32)
    return _Plan(tuple(groups), int(missing.size), position)


def _by_plan(x: jax.Array, plan: _Plan, reduce, fill: float) -> jax.Array:
    """`[..., V_t] -> [..., V_s]`: each student token's teacher entries gathered (a static
    gather along the last axis, per fan-in group) and reduced (`reduce(..., axis=-1)`);
    `fill` where none map. Column gathers with static indices need no transposes and no
    scatter (both slow on CPU; benchmarks/cross_tokenizer.py, docs/results/lm.md)."""
    parts = []
    for f, ids in plan.groups:
        g = x[..., ids]
        parts.append(g if f == 1 else reduce(g.reshape(x.shape[:-1] + (ids.size // f, f)),
                                             axis=-1))
    parts.append(jnp.full(x.shape[:-1] + (plan.missing,), fill, x.dtype))
    return jnp.concatenate(parts, axis=-1)[..., plan.position]


def _scatter_rows(mass, target, keep, student_vocab_size: int) -> jax.Array:
    """The same sum by a scatter-add over the vocabulary axis put first, `[V_t, N] ->
    [V_s, N]` (V_t row updates, not N * V_t single ones): for maps known only when traced."""
    lead = mass.shape[:-1]
    rows = mass.reshape(-1, mass.shape[-1]).T
    q = jnp.zeros((student_vocab_size, rows.shape[1]), mass.dtype)
    return q.at[jnp.where(keep, target, 0)].add(rows).T.reshape(lead + (student_vocab_size,))


def project_logits(logits: jax.Array, projection: VocabProjection, *,
                   method: str = "prefix") -> jax.Array:
    """Teacher logits `[..., V_t]` -> student-vocabulary logits `[..., V_s]` whose softmax is
    `project_probs(softmax(logits))`: the log of the projected probabilities, with
    `UNKNOWN_LOGIT` where they are 0 (finite, so nothing downstream is NaN). What the
    distillation steps take as a teacher's logits; a temperature T then applies to the
    projected distribution (:math:`q^{1/T}` renormalised)."""
    logits = jnp.asarray(logits)
    _checks.check_float(logits, "logits")
    check_projection(projection, logits.shape[-1], method=method)
    z = logits.astype(jnp.float32)
    target = projection.prefix if method == "prefix" else projection.exact
    plan = _gather_plan(target, projection.student_vocab_size)
    if plan is None:  # traced maps: through the probabilities
        q = project_probs(jax.nn.softmax(z, axis=-1), projection, method=method)
        return jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), UNKNOWN_LOGIT)
    # In log space, with no softmax and no log of the projected probabilities:
    # log q_s = logsumexp_{t: pi(t)=s} z_t - logsumexp_{t: pi(t)>=0} z_t (for fan-in 1, a
    # gathered logit minus one normaliser).
    norm = jax.nn.logsumexp(jnp.where(jnp.asarray(target) >= 0, z, -jnp.inf), axis=-1,
                            keepdims=True)
    out = _by_plan(z, plan, jax.nn.logsumexp, -jnp.inf) - norm
    return jnp.where(jnp.isfinite(out), out, UNKNOWN_LOGIT)


def uld_distance(student_logits: jax.Array, teacher_probs: jax.Array,
                 projection: VocabProjection, *, temperature: float | jax.Array = 1.0
                 ) -> jax.Array:
    r"""ULD's sorted-probability L1 between the unmatched parts, `[...]` per position.

    :math:`\sum_i |\mathrm{sort}_\downarrow(p \odot 1[e<0])_i -
    \mathrm{sort}_\downarrow(\mathrm{softmax}(z/T) \odot 1[\neg m])_i|`, p the teacher's
    probabilities `[..., V_t]`, z the student's logits `[..., V_s]`, e = `projection.exact`,
    m = `projection.student_matched`; the shorter sorted vector is padded with zeros (the
    Wasserstein-1 distance under a uniform cost, Boizard et al. 2024). Differentiable in
    the student's logits (the sort is a permutation); 0 when both unmatched parts are empty.

    Example:
      >>> import jax.numpy as jnp
      >>> proj = VocabProjection.from_maps([0, -1, -1], [0, 0, 0], student_vocab_size=2)
      >>> z = jnp.log(jnp.array([0.5, 0.5]))
      >>> round(float(uld_distance(z, jnp.array([0.5, 0.1, 0.4]), proj)), 4)   # |.4-.5|+|.1-0|
      0.2
    """
    teacher_probs = jnp.asarray(teacher_probs)
    check_projection(projection, teacher_probs.shape[-1])
    if jnp.shape(student_logits)[-1] != projection.student_vocab_size:
        raise ValueError(
            f"`student_logits` have {jnp.shape(student_logits)[-1]} entries but the projection "
            f"maps onto a student vocabulary of {projection.student_vocab_size}."
        )
    q = softmax_t(jnp.asarray(student_logits), temperature=temperature)
    t_un = jnp.where(jnp.asarray(projection.exact) < 0, teacher_probs, 0.0)
    s_un = jnp.where(jnp.asarray(projection.student_matched), 0.0, q)
    width = max(t_un.shape[-1], s_un.shape[-1])

    def sorted_desc(x):
        x = -jnp.sort(-x, axis=-1)
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    return jnp.sum(jnp.abs(sorted_desc(t_un) - sorted_desc(s_un)), axis=-1)


def _top_and_rest(x: jax.Array, size: int) -> jax.Array:
    """`[..., n] -> [..., size + 1]`: the `size` largest entries in descending order (zeros
    past n), then the sum of the others."""
    k = min(size, x.shape[-1])
    top = jax.lax.top_k(x, k)[0]
    rest = jnp.sum(x, axis=-1, keepdims=True) - jnp.sum(top, axis=-1, keepdims=True)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, size - k)]
    return jnp.concatenate([jnp.pad(top, pad), jnp.maximum(rest, 0.0)], axis=-1)


def unmatched_top(probs: jax.Array, projection: VocabProjection, *, size: int) -> jax.Array:
    """The teacher's side of ULD, precomputed: its probabilities on unmatched tokens
    (`projection.exact` -1), the `size` largest in descending order, then the rest of their
    mass: `[..., V_t] -> [..., size + 1]`. What `uld_from_top` compares the student with;
    `size` >= V_t keeps everything."""
    probs = jnp.asarray(probs)
    check_projection(projection, probs.shape[-1])
    return _top_and_rest(jnp.where(jnp.asarray(projection.exact) < 0, probs, 0.0), size)


def uld_from_top(student_logits: jax.Array, teacher_top: jax.Array,
                 student_unmatched: jax.Array) -> jax.Array:
    r"""ULD's sorted L1 from the teacher's precomputed top (`unmatched_top`), `[...]`.

    :math:`\sum_{i<M} |a_i - b_i| + |a_{rest} - b_{rest}|`, a = the teacher's top-M unmatched
    probabilities and the rest of their mass, b the same of the student's softmax (T = 1)
    on its unmatched tokens (`student_unmatched` bool `[V_s]`, `~projection.student_matched`).
    Equal to `uld_distance` when M covers both vocabularies; with a smaller M the tail is
    compared by its mass only (a lower bound of the full term).
    """
    size = teacher_top.shape[-1] - 1
    unmatched = jnp.asarray(student_unmatched)
    q = jax.nn.softmax(jnp.asarray(student_logits, jnp.float32), axis=-1)
    k = min(size, q.shape[-1])
    # The top-M positions are chosen without gradient; the probabilities are then gathered
    # from q, and the unmatched mass is one matrix product: under `jax.vmap` over teachers
    # (q shared) the backward pass is one scatter into q's gradient and one product, not a
    # [V] array per teacher (benchmarks/cross_tokenizer.py --method uld).
    idx = jax.lax.top_k(jnp.where(unmatched, jax.lax.stop_gradient(q), -1.0), k)[1]
    top = jnp.where(unmatched[idx], jnp.take_along_axis(q, idx, axis=-1), 0.0)
    rest = q @ unmatched.astype(q.dtype) - jnp.sum(top, axis=-1)
    pad = [(0, 0)] * (top.ndim - 1) + [(0, size - k)]
    s_top = jnp.concatenate([jnp.pad(top, pad), jnp.maximum(rest, 0.0)[..., None]], axis=-1)
    return jnp.sum(jnp.abs(teacher_top - s_top), axis=-1)
