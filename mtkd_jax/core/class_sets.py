r"""Teachers that know different sets of classes, fused in one global class space.

Each teacher k declares the classes it knows: a **class map** `[C_k]` of distinct indices
into a global class list of C classes (its output j is global class `class_map[j]`). The
library works in the global space:

* teacher logits are placed in `[K, ..., C]` (`to_global_logits`), with the **known** mask
  `[K, C]` (`known_mask`); a class a teacher does not know gets the logit `UNKNOWN_LOGIT`
  (-1e9), so every softmax, log-softmax, max and logsumexp over classes ignores it (its
  probability is exactly 0 in float32) and nothing is ever NaN or inf;
* a teacher's distribution is **renormalised over the classes it knows**:
  :math:`\tilde p_{kc} = \exp(z_{kc}/T) / \sum_{c' \in S_k} \exp(z_{kc'}/T)` for
  :math:`c \in S_k`, 0 otherwise (`renormalised_probs`; the softmax of the masked logits);
* the fused target (`mtkd_jax.objective.targets.distill_targets` with `known`) is
  :math:`t_c = \sum_k w_k \tilde p_{kc}` with weights :math:`w_k \ge 0`,
  :math:`\sum_k w_k = 1`. Read :math:`w_k` as the probability that the input belongs to
  teacher k's classes, :math:`\hat P(y \in S_k \mid x)`: with disjoint class sets t is then
  exactly :math:`\hat P(y \in S_k \mid x)\, \tilde p_k(y \mid x, y \in S_k)`, the chain rule.
  Where class sets overlap, a class known to several teachers gets their weighted sum.
  Who estimates :math:`\hat P(y \in S_k \mid x)` is the weighting strategy: ``uniform`` says
  1/K (the naive ensemble); the routing strategies of `mtkd_jax.weighting.routing`
  (``energy``, ``max_logit``, ``calibrated``, ``gate``) estimate it from each teacher's
  logits, and with labels a teacher that gives the label probability 0 is routed away by
  ``confidence``. Strategies see the masked logits, so they all work unchanged;
* divergences between two teachers are taken over the classes **both** know, each
  distribution renormalised over them (`pairwise_divergence_known`); a pair that shares no
  class has divergence 0 (there is nothing to compare) and `shared_classes` says so.

A teacher that knows every class is exactly today's teacher: the mask changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.divergence import DIVERGENCES, softmax_t

__all__ = [
    "UNKNOWN_LOGIT",
    "check_class_map",
    "known_mask",
    "check_known",
    "known_of",
    "to_global_logits",
    "mask_unknown",
    "renormalised_probs",
    "shared_classes",
    "pairwise_divergence_known",
]

UNKNOWN_LOGIT = -1e9
"""The logit of a class a teacher does not know: finite (no inf - inf = NaN), and far enough
below any real logit that its probability is exactly 0 at any temperature up to ~1e6."""


def check_class_map(class_map, *, num_classes: int, name: str = "class_map") -> np.ndarray:
    """A teacher's class map as an int array `[C_k]`; ValueError/TypeError on bad input.

    Args:
      class_map: `[C_k]` distinct ints in `[0, num_classes)`: output j of the teacher is
        global class `class_map[j]`.
      num_classes: C, the size of the global class list.
      name: the argument's name in error messages.

    Example:
      >>> from mtkd_jax.core.class_sets import check_class_map
      >>> check_class_map([3, 0], num_classes=4).tolist()
      [3, 0]
      >>> check_class_map([0, 0], num_classes=4)
      Traceback (most recent call last):
      ...
      ValueError: `class_map` must hold distinct classes; 0 appears more than once.
    """
    _checks.check_int(num_classes, "num_classes")
    m = np.asarray(class_map)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D list of class indices [C_k], "
                         f"got shape {m.shape}.")
    if not np.issubdtype(m.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer class indices, got dtype {m.dtype}.")
    bad = m[(m < 0) | (m >= num_classes)]
    if bad.size:
        raise ValueError(f"`{name}` must hold classes in [0, {num_classes}); got "
                         f"{sorted(set(bad.tolist()))}.")
    values, counts = np.unique(m, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"`{name}` must hold distinct classes; "
                         f"{', '.join(map(str, values[counts > 1].tolist()))} appears more "
                         "than once.")
    return m.astype(np.int32)


def known_mask(class_maps: Sequence, *, num_classes: int) -> np.ndarray:
    """The known mask `[K, C]` bool of K teachers' class maps (see `check_class_map`).

    Example:
      >>> from mtkd_jax.core.class_sets import known_mask
      >>> known_mask([[0, 1], [2]], num_classes=3).astype(int).tolist()
      [[1, 1, 0], [0, 0, 1]]
    """
    if isinstance(class_maps, np.ndarray | jax.Array) or len(class_maps) == 0:
        raise ValueError("`class_maps` must be a non-empty sequence of K class maps [C_k], one "
                         "per teacher.")
    known = np.zeros((len(class_maps), num_classes), bool)
    for k, m in enumerate(class_maps):
        known[k, check_class_map(m, num_classes=num_classes, name=f"class_maps[{k}]")] = True
    return known


def check_known(known, num_teachers: int, num_classes: int, name: str = "known") -> jax.Array:
    """Check a known mask `[K, C]` against K and C; return it as a bool array.

    Concrete masks must give every teacher at least one class; traced ones are not read.
    """
    shape = tuple(jnp.shape(known))
    if shape != (num_teachers, num_classes):
        raise ValueError(
            f"`{name}` must have shape [K, C]=({num_teachers}, {num_classes}), one row of "
            f"known classes per teacher; got {shape}."
        )
    if not _checks.is_traced(known):
        rows = np.asarray(known).astype(bool).any(axis=1)
        if not rows.all():
            raise ValueError(f"`{name}`: teacher(s) {np.flatnonzero(~rows).tolist()} know no "
                             "class; every teacher must know at least one.")
    return jnp.asarray(known).astype(bool)


def known_of(logits: jax.Array) -> jax.Array:
    """Which entries of masked logits `[K, ..., C]` are known classes (`> UNKNOWN_LOGIT/2`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.class_sets import UNKNOWN_LOGIT, known_of
      >>> known_of(jnp.array([1.0, UNKNOWN_LOGIT])).tolist()
      [True, False]
    """
    return jnp.asarray(logits) > UNKNOWN_LOGIT / 2


def to_global_logits(local_logits: Sequence, class_maps: Sequence, *,
                     num_classes: int) -> jax.Array:
    """K teachers' own logits `[..., C_k]` -> global-space logits `[K, ..., C]`.

    Output j of teacher k goes to global class `class_maps[k][j]`; classes it does not know
    get `UNKNOWN_LOGIT`. Jit-safe (the class maps are static).

    Args:
      local_logits: K arrays `[..., C_k]` with the same batch dims.
      class_maps: K class maps `[C_k]`.
      num_classes: C.

    Returns:
      `[K, ..., C]` float (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.class_sets import to_global_logits
      >>> z = to_global_logits([jnp.array([[1.0, 2.0]]), jnp.array([[3.0]])], [[2, 0], [1]],
      ...                      num_classes=3)
      >>> (z > -1e8).astype(int)[:, 0].tolist(), float(z[0, 0, 2]), float(z[1, 0, 1])
      ([[1, 0, 1], [0, 1, 0]], 1.0, 3.0)
    """
    if len(local_logits) != len(class_maps):
        raise ValueError(f"`local_logits` holds {len(local_logits)} teachers but `class_maps` "
                         f"{len(class_maps)}; give one class map per teacher.")
    known_mask(class_maps, num_classes=num_classes)  # checks every map
    out = []
    for k, (z, m) in enumerate(zip(local_logits, class_maps, strict=True)):
        z = jnp.asarray(z)
        _checks.check_float(z, f"local_logits[{k}]")
        m = np.asarray(m, np.int32)
        if z.shape[-1:] != m.shape:
            raise ValueError(f"`local_logits[{k}]` has {z.shape[-1:]} outputs but "
                             f"`class_maps[{k}]` maps {m.shape[0]}; they must match.")
        if out and z.shape[:-1] != out[0].shape[:-1]:
            raise ValueError(f"`local_logits[{k}]` has batch dims {z.shape[:-1]}, teacher 0 "
                             f"{out[0].shape[:-1]}; they must match.")
        dtype = jnp.promote_types(z.dtype, jnp.float32)
        g = jnp.full(z.shape[:-1] + (num_classes,), UNKNOWN_LOGIT, dtype)
        out.append(g.at[..., m].set(z.astype(dtype)))
    return jnp.stack(out)


def mask_unknown(logits: jax.Array, known) -> jax.Array:
    """Global-space logits `[K, ..., C]` with `UNKNOWN_LOGIT` wherever `known` `[K, C]` is 0.

    Known entries are returned unchanged (a full mask is the identity); unknown ones may hold
    anything, -inf or NaN included.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.class_sets import mask_unknown
      >>> z = jnp.array([[[1.0, -jnp.inf]], [[2.0, 3.0]]])             # [K=2, B=1, C=2]
      >>> mask_unknown(z, jnp.array([[True, False], [True, True]]))[:, 0].tolist()
      [[1.0, -1000000000.0], [2.0, 3.0]]
    """
    logits = jnp.asarray(logits)
    k = _checks.check_teachers(logits, "logits")
    known = check_known(known, k, logits.shape[-1])
    known = known.reshape((k,) + (1,) * (logits.ndim - 2) + (logits.shape[-1],))
    return jnp.where(known, logits, jnp.asarray(UNKNOWN_LOGIT, logits.dtype))


def renormalised_probs(logits: jax.Array, known, *,
                       temperature: float | jax.Array = 1.0) -> jax.Array:
    r"""Each teacher's softmax at T renormalised over the classes it knows, 0 elsewhere.

    :math:`\tilde p_{kc} = [c \in S_k]\, e^{z_{kc}/T} / \sum_{c' \in S_k} e^{z_{kc'}/T}`.

    Args:
      logits: `[K, ..., C]` global-space logits (unknown entries may hold anything).
      known: `[K, C]` bool.
      temperature: T > 0.

    Returns:
      `[K, ..., C]`, each teacher's row summing to 1 over its known classes.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.class_sets import renormalised_probs
      >>> z = jnp.zeros((2, 1, 3))
      >>> renormalised_probs(z, jnp.array([[1, 1, 0], [0, 0, 1]]))[:, 0].tolist()
      [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    """
    return softmax_t(mask_unknown(logits, known), temperature=temperature)


def shared_classes(known) -> jax.Array:
    """`[K, K]` number of classes both teachers i and j know (the diagonal: |S_i|).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.class_sets import shared_classes
      >>> shared_classes(jnp.array([[1, 1, 0], [0, 1, 1]])).tolist()
      [[2, 1], [1, 2]]
    """
    known = jnp.asarray(known).astype(jnp.int32)
    return known @ known.T


def pairwise_divergence_known(probs: jax.Array, known, *, kind: str = "squared") -> jax.Array:
    r"""`pairwise_divergence` over the classes both teachers know.

    For each pair (i, j): both distributions restricted to :math:`S_i \cap S_j` and
    renormalised there, then :math:`D(p_i|_{ij}, p_j|_{ij})` of `kind`. A pair that shares
    no class gets 0; a pair where a teacher puts (numerically) no mass on the shared classes
    compares the uniform distribution over them. With a full mask this is
    `mtkd_jax.pairwise_divergence` exactly.

    Args:
      probs: `[K, ..., C]` global-space probabilities (e.g. `renormalised_probs`).
      known: `[K, C]` bool.
      kind: one of `mtkd_jax.DIVERGENCES`.

    Returns:
      `[..., K, K]`, zero on the diagonal.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.class_sets import pairwise_divergence_known
      >>> p = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])    # shared class: 1 only
      >>> pairwise_divergence_known(p, jnp.array([[1, 1, 0], [0, 1, 1]])).tolist()
      [[0.0, 0.0], [0.0, 0.0]]
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"`kind` must be one of {sorted(DIVERGENCES)}, got {kind!r}.")
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs", min_teachers=2)
    known = check_known(known, k, probs.shape[-1])
    both = (known[:, None] & known[None, :]).astype(probs.dtype)  # [K, K, C]
    both = both.reshape((k, k) + (1,) * (probs.ndim - 2) + (probs.shape[-1],))

    count = jnp.sum(both, axis=-1, keepdims=True)
    every = count == probs.shape[-1]  # a pair that shares every class: p as given, exactly

    def restrict(p):  # p [K, K, ..., C] -> renormalised over the shared classes of the pair
        q = p * both
        mass = jnp.sum(q, axis=-1, keepdims=True)
        q = jnp.where(mass > 0, q / jnp.where(mass > 0, mass, 1.0), both / jnp.maximum(count, 1))
        return jnp.where(every, p, q)

    pi = restrict(jnp.broadcast_to(probs[:, None], (k,) + probs.shape))
    pj = restrict(jnp.broadcast_to(probs[None, :], (k,) + probs.shape))
    d = DIVERGENCES[kind](pi, pj)  # [K, K, ...]
    any_shared = jnp.sum(both, axis=-1) > 0
    off = 1.0 - jnp.eye(k, dtype=d.dtype)
    d = jnp.where(any_shared, d, 0.0) * off.reshape((k, k) + (1,) * (d.ndim - 2))
    return jnp.moveaxis(d, (0, 1), (-2, -1))
