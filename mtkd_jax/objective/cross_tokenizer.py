r"""Teachers with their own tokenizers, carried onto the student's positions and vocabulary.

Each teacher k reads the same text in its own tokens (its rows `[B, L_t]` from
`mtkd_jax.data.alignment.pack_aligned`) and returns logits over its own vocabulary
`[B, L_t, V_t_k]`. `aligned_teacher_logits` turns them into what every distillation step
takes, teacher axis first:

1. **gather** teacher k's logits at the position aligned with each student position
   (`teacher_index` `[K, B, L]`: the teacher token that ends at the same byte);
2. **project** them onto the student's vocabulary (`mtkd_jax.core.vocab_projection`, method
   ``"prefix"`` or ``"uld"``): logits `[B, L, V_s]` whose softmax is the projected
   distribution;
3. **stack** them `[K, B, L, V_s]`, with `teacher_available` `[K, B, L]` (1 where teacher k
   can speak at that student position).

Put the two into the batch (`batch["teacher_logits"]`, `batch["teacher_available"]`) and
`mtkd_jax.training.steps.make_distill_step` (teacher_apply=None) weights the teachers per
student token over the ones that can speak there (`distill_targets(available=)`); a token
no teacher can speak at has soft loss 0 and is counted (metric ``unaligned``). A teacher whose
projection is the identity (its tokenizer is the student's, `is_identity`) is only gathered,
so it gives exactly the numbers of the shared-vocabulary path.

With method ``"uld"`` the target holds the teachers' exactly matched mass, and the unmatched
mass is compared by ULD's sorted L1: `aligned_unmatched` gives each teacher's top unmatched
probabilities `[K, B, L, M + 1]` (``batch["teacher_unmatched"]``) and the step adds
:math:`\lambda \sum_k w_k \mathrm{ULD}_k` per token (`make_distill_step(student_unmatched=
student_unmatched(projections), uld_weight=)`). `aligned_uld_sums` is the same term whole
(every unmatched token, uniform over the available teachers), for a loop of one's own.

Memory: the stacked `[K, B, L, V_s]` is held once per batch (as precomputed teacher logits
are); the chunked loss (`student_head`) slices it, so the student's `[B, L, V_s]` logits and
the targets are never whole.

**Chunked** (`aligned_teacher_heads`, method ``"prefix"``): the teachers' *features* are
gathered at the aligned positions (`[K, B, L, H]`, cheap), and each chunk of positions goes
through the teachers' output heads and the projection inside the chunked loss
(`make_distill_step(..., teacher_head=)`), so no `[K, B, L, V_s]` array exists at all and
the projection's passes run on cache-sized chunks: the same numbers as the path above, much
faster (benchmarks/cross_tokenizer.py times both against the same-tokenizer step). The batch
carries the teachers' rows inside its input (`aligned_inputs`) and the student function
reads `x["student"]` (`student_input`)::

    t_apply, t_head = aligned_teacher_heads([f.features for f in fns], [f.head for f in fns],
                                            projections)
    step = make_distill_step(student_input(s.features), t_apply, tx, student_head=s.head,
                             teacher_head=t_head, chunk_size=32, weighting="confidence")
    state, metrics = step(state, aligned_inputs(batch), key, teacher_params=params)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mtkd_jax.core.reduce import masked_sum
from mtkd_jax.core.vocab_projection import (
    VocabProjection,
    check_projection,
    is_identity,
    project_logits,
    uld_distance,
    unmatched_top,
)

__all__ = ["TEACHER_ROWS", "aligned_inputs", "aligned_teacher_heads", "aligned_teacher_logits",
           "aligned_uld_sums", "aligned_unmatched", "gather_aligned", "make_aligned_teachers",
           "student_input", "student_unmatched"]

TEACHER_ROWS = ("teacher_tokens", "teacher_segment_ids", "teacher_positions", "teacher_index")
"""`pack_aligned`'s fields `[K, B, ...]` that the teachers read (besides `teacher_available`)."""


def _check_alignment(teacher_logits, index, available, projections):
    k = len(teacher_logits)
    if len(projections) != k:
        raise ValueError(f"{k} teachers' logits but {len(projections)} projections: one "
                         "projection per teacher, in the same order.")
    if jnp.ndim(index) != 3 or jnp.shape(index)[0] != k:
        raise ValueError(f"`index` must have shape [K, B, L] with K={k}, got "
                         f"{jnp.shape(index)}.")
    if tuple(jnp.shape(available)) != tuple(jnp.shape(index)):
        raise ValueError(f"`available` must have the shape of `index` {jnp.shape(index)}, got "
                         f"{jnp.shape(available)}.")
    for i, (z, proj) in enumerate(zip(teacher_logits, projections, strict=True)):
        if jnp.ndim(z) != 3 or jnp.shape(z)[0] != jnp.shape(index)[1]:
            raise ValueError(f"teacher {i}'s logits must have shape [B, L_t, V_t] with "
                             f"B={jnp.shape(index)[1]}, got {jnp.shape(z)}.")
        check_projection(proj, jnp.shape(z)[-1])


def gather_aligned(logits: jax.Array, index: jax.Array) -> jax.Array:
    """`[B, L_t, V] -> [B, L, V]`: row b, student position i takes teacher position
    `index[b, i]`."""
    return jnp.take_along_axis(logits, jnp.asarray(index)[..., None], axis=1)


def aligned_teacher_logits(
    teacher_logits: Sequence[jax.Array],
    index: jax.Array,
    available: jax.Array,
    projections: Sequence[VocabProjection],
    *,
    method: str = "prefix",
) -> tuple[jax.Array, jax.Array]:
    r"""K teachers' own-vocabulary logits -> student-position, student-vocabulary logits.

    :math:`\tilde z_k[b, i] = \log \mathrm{proj}_k(\mathrm{softmax}(z_k[b, \iota_k[b, i]]))`
    (`project_logits`; just :math:`z_k[b, \iota_k[b, i]]` for an identity projection).

    Args:
      teacher_logits: K arrays `[B, L_t, V_t_k]` (row lengths and vocabularies may differ).
      index: int `[K, B, L]`, `teacher_index` of `pack_aligned` (a position in `[0, L_t)`).
      available: `[K, B, L]`, `teacher_available` of `pack_aligned`.
      projections: K `VocabProjection`s onto the same student vocabulary (V_s).
      method: ``"prefix"`` or ``"uld"`` (`mtkd_jax.core.vocab_projection`).

    Returns:
      `(logits [K, B, L, V_s], available [K, B, L] float32)`.

    Raises:
      ValueError: mismatched shapes, a projection built for another vocabulary size, or
        projections onto different student vocabularies.
    """
    _check_alignment(teacher_logits, index, available, projections)
    sizes = {p.student_vocab_size for p in projections}
    if len(sizes) != 1:
        raise ValueError(f"the projections map onto student vocabularies of sizes "
                         f"{sorted(sizes)}: they must share the student's.")
    out = []
    for k, (z, proj) in enumerate(zip(teacher_logits, projections, strict=True)):
        g = gather_aligned(z, index[k])
        out.append(g if is_identity(proj) else project_logits(g, proj, method=method))
    dtype = jnp.result_type(*out)
    return (jnp.stack([o.astype(dtype) for o in out]),
            jnp.asarray(available, jnp.float32))


def aligned_unmatched(
    teacher_logits: Sequence[jax.Array],
    index: jax.Array,
    projections: Sequence[VocabProjection],
    *,
    size: int,
) -> jax.Array:
    """Each teacher's top-`size` unmatched probabilities (T = 1) at the aligned positions,
    and the rest of that mass: `[K, B, L, size + 1]` (`unmatched_top`), the teachers' side
    of the ULD term (``batch["teacher_unmatched"]``)."""
    _check_alignment(teacher_logits, index, index, projections)
    return jnp.stack([
        unmatched_top(jax.nn.softmax(gather_aligned(z, index[k]).astype(jnp.float32), -1),
                      proj, size=size)
        for k, (z, proj) in enumerate(zip(teacher_logits, projections, strict=True))])


def student_unmatched(projections: Sequence[VocabProjection]) -> jax.Array:
    """bool `[K, V_s]`: the student tokens that teacher k matches no token to (the student's
    side of the ULD term; `make_distill_step(student_unmatched=)`)."""
    return jnp.stack([~jnp.asarray(p.student_matched) for p in projections])


def aligned_uld_sums(
    student_logits: jax.Array,
    teacher_logits: Sequence[jax.Array],
    index: jax.Array,
    available: jax.Array,
    projections: Sequence[VocabProjection],
    *,
    mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    r"""ULD's term for the unmatched mass, summed over the positions: `(sum, count)`.

    :math:`\sum_{b,i} m_{bi} \frac{1}{|A_{bi}|} \sum_{k \in A_{bi}}
    \mathrm{ULD}(z_s[b,i], p_k[b, \iota_k[b,i]])` with `uld_distance`, :math:`A_{bi}` the
    teachers available at (b, i) (a position with none adds 0), and `count` the number of
    counted positions :math:`\sum m_{bi}`; divide the global sums (`reduce.normalize`) and
    add the mean, times a weight, to the distillation loss. Differentiable in
    `student_logits` `[B, L, V_s]`; teacher probabilities at temperature T.
    """
    _check_alignment(teacher_logits, index, available, projections)
    avail = jnp.asarray(available) > 0
    per = []
    for k, (z, proj) in enumerate(zip(teacher_logits, projections, strict=True)):
        p = jax.nn.softmax(jax.lax.stop_gradient(gather_aligned(z, index[k])).astype(
            jnp.float32) / temperature, axis=-1)
        per.append(jnp.where(avail[k], uld_distance(student_logits, p, proj,
                                                    temperature=temperature), 0.0))
    n = jnp.sum(avail, axis=0)
    value = jnp.where(n > 0, jnp.sum(jnp.stack(per), 0) / jnp.maximum(n, 1), 0.0)
    if mask is None:
        mask = jnp.ones(value.shape, jnp.float32)
    return masked_sum(value, mask), jnp.sum(jnp.asarray(mask, jnp.float32))


def make_aligned_teachers(
    applies: Sequence[Callable],
    projections: Sequence[VocabProjection],
    *,
    method: str = "prefix",
    uld_size: int = 16,
) -> Callable:
    """A teacher function for teachers with their own tokenizers.

    Args:
      applies: K functions `apply_k(params_k, x_k) -> [B, L_t, V_t_k]`, `x_k` the dict
        ``{"tokens", "segment_ids", "positions"}`` of teacher k's rows (what the library's
        transformer reads).
      projections: K `VocabProjection`s (`mtkd_jax.data.alignment.build_projection`).
      method: ``"prefix"`` or ``"uld"``.
      uld_size: M, unmatched probabilities kept per teacher and token for the ULD term (the
        rest compared by its mass); the step's cost grows with M (measured by
        `benchmarks/cross_tokenizer.py`).

    Returns:
      `teachers(params, batch) -> dict`, `params` a sequence of K teacher params, `batch`
      holding `pack_aligned`'s ``teacher_*`` fields `[K, B, ...]`; the dict holds
      ``"teacher_logits"`` `[K, B, L, V_s]` and ``"teacher_available"`` `[K, B, L]` (and
      with ``"uld"``, ``"teacher_unmatched"`` `[K, B, L, M + 1]`): merge it into the batch
      of `make_distill_step(..., teacher_apply=None)` (with ``"uld"``, built with
      `student_unmatched=student_unmatched(projections)`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.vocab_projection import VocabProjection
      >>> proj = VocabProjection.from_maps([0, 1, -1], [0, 1, 1], student_vocab_size=2)
      >>> fn = make_aligned_teachers([lambda p, x: p[x["tokens"]]], [proj])
      >>> batch = {"teacher_tokens": jnp.zeros((1, 1, 3), jnp.int32),
      ...          "teacher_segment_ids": jnp.ones((1, 1, 3), jnp.int32),
      ...          "teacher_positions": jnp.arange(3)[None, None],
      ...          "teacher_index": jnp.array([[[0, 2]]]), "teacher_available": jnp.ones((1, 1, 2))}
      >>> out = fn([jnp.log(jnp.array([[0.5, 0.25, 0.25]]))], batch)
      >>> out["teacher_logits"].shape, jnp.exp(out["teacher_logits"][0, 0, 0]).tolist()
      ((1, 1, 2, 2), [0.5, 0.5])
    """
    if len(applies) != len(projections):
        raise ValueError(f"{len(applies)} teachers but {len(projections)} projections.")
    applies, projections = tuple(applies), tuple(projections)

    def teachers(params, batch):
        logits = []
        for k, apply in enumerate(applies):
            x = {"tokens": batch["teacher_tokens"][k],
                 "segment_ids": batch["teacher_segment_ids"][k],
                 "positions": batch["teacher_positions"][k]}
            logits.append(jax.lax.stop_gradient(apply(params[k], x)))
        z, a = aligned_teacher_logits(logits, batch["teacher_index"],
                                      batch["teacher_available"], projections, method=method)
        out = {"teacher_logits": z, "teacher_available": a}
        if method == "uld":
            out["teacher_unmatched"] = aligned_unmatched(logits, batch["teacher_index"],
                                                         projections, size=uld_size)
        return out

    return teachers


def aligned_inputs(batch: dict) -> dict:
    """The batch for the chunked aligned step (`aligned_teacher_heads`): its `x` becomes
    ``{"student": x, "teachers": {field: [B, K, ...]}}``, the teachers' rows (`TEACHER_ROWS`)
    moved inside it with the row axis first, so that every leaf of `x` has the batch axis
    first (the step's sharding and micro-batches split them with the student's rows). The
    other fields (``teacher_available`` `[K, B, L]` included) are kept.

    Raises:
      KeyError: a field of `TEACHER_ROWS` missing (a batch not from `pack_aligned`).
    """
    missing = [f for f in TEACHER_ROWS if f not in batch]
    if missing:
        raise KeyError(f"the batch has no {missing}: the aligned teachers' rows come from "
                       "`mtkd_jax.data.alignment.pack_aligned`.")
    rows = {f: jnp.swapaxes(jnp.asarray(batch[f]), 0, 1) for f in TEACHER_ROWS}
    out = {k: v for k, v in batch.items() if k not in TEACHER_ROWS}
    out["x"] = {"student": batch["x"], "teachers": rows}
    return out


def student_input(fn: Callable) -> Callable:
    """`fn(params, x["student"], *args)`: a student function for batches of
    `aligned_inputs` (the teachers' rows in `x` are for the teachers only)."""
    def student(params, x, *args, **kwargs):
        return fn(params, x["student"], *args, **kwargs)

    return student


def aligned_teacher_heads(
    features: Sequence[Callable],
    heads: Sequence[Callable],
    projections: Sequence[VocabProjection],
    *,
    method: str = "prefix",
) -> tuple[Callable, Callable]:
    r"""`(teacher_apply, teacher_head)` for the chunked step with teachers that have their
    own tokenizers: `make_distill_step(student_input(f), teacher_apply, tx,
    student_head=..., teacher_head=teacher_head, chunk_size=...)`, batches from
    `aligned_inputs`.

    `teacher_apply(params, x)` runs teacher k's `features[k](params[k], rows_k)` on its own
    rows (``{"tokens", "segment_ids", "positions"}``) and gathers them at the aligned
    positions: `[K, B, L, H]` (H the widest teacher's; narrower ones zero-padded).
    `teacher_head(params, f [K, B, c, H])` gives each chunk's
    :math:`\log \mathrm{proj}_k(\mathrm{softmax}(\mathrm{head}_k(f_k)))` `[K, B, c, V_s]`
    (`project_logits`; the head's logits as they are for an identity projection): the same
    values as `make_aligned_teachers`, chunk by chunk.

    Args:
      features: K functions `(params_k, rows_k) -> [B, L_t, H_k]`.
      heads: K functions `(params_k, [B, c, H_k]) -> [B, c, V_t_k]`.
      projections: K `VocabProjection`s onto one student vocabulary.
      method: ``"prefix"`` (the ULD term needs each teacher's whole unmatched distribution
        per position: use `make_aligned_teachers` for ``"uld"``).

    Raises:
      ValueError: mismatched lengths, another method, projections onto different student
        vocabularies.
    """
    features, heads, projections = tuple(features), tuple(heads), tuple(projections)
    if not len(features) == len(heads) == len(projections):
        raise ValueError(f"{len(features)} feature functions, {len(heads)} heads and "
                         f"{len(projections)} projections: one of each per teacher.")
    if method != "prefix":
        raise ValueError(f"the chunked aligned teachers support method 'prefix', got "
                         f"{method!r} (use `make_aligned_teachers` for 'uld').")
    sizes = {p.student_vocab_size for p in projections}
    if len(sizes) != 1:
        raise ValueError(f"the projections map onto student vocabularies of sizes "
                         f"{sorted(sizes)}: they must share the student's.")
    def width(k, params):  # H_k, from the shapes alone (a one-token row, never run)
        one = jnp.zeros((1, 1), jnp.int32)
        rows = {"tokens": one, "segment_ids": one + 1, "positions": one}
        return jax.eval_shape(features[k], params[k], rows).shape[-1]

    def teacher_apply(params, x):
        rows = x["teachers"]
        out = []
        for k, fn in enumerate(features):
            f = fn(params[k], {"tokens": rows["teacher_tokens"][:, k],
                               "segment_ids": rows["teacher_segment_ids"][:, k],
                               "positions": rows["teacher_positions"][:, k]})
            out.append(gather_aligned(f, rows["teacher_index"][:, k]))
        h = max(o.shape[-1] for o in out)
        dtype = jnp.result_type(*out)
        return jnp.stack([jnp.pad(o.astype(dtype), [(0, 0), (0, 0), (0, h - o.shape[-1])])
                          for o in out])

    def teacher_head(params, f):
        out = []
        for k, (head, proj) in enumerate(zip(heads, projections, strict=True)):
            z = head(params[k], f[k, ..., :width(k, params)])
            check_projection(proj, z.shape[-1])
            out.append(z if is_identity(proj) else project_logits(z, proj, method=method))
        return jnp.stack([o.astype(jnp.float32) for o in out])

    return teacher_apply, teacher_head
