r"""Top-k teacher outputs: what a top-k cache stores, and how full logits are rebuilt from it.

A top-k entry holds, per teacher, the k largest **log-probabilities at T = 1**
(`log_softmax(z)`), their class indices and the log of the mass outside the top-k,
:math:`\log(1 - \sum_{top k} p)` (computed from the logits, so it stays accurate when that
mass is tiny; `top_k_of_logits`). Log-probabilities rather than raw logits because the
largest is close to 0, where float16 is most precise.

An entry is turned back into logits `[K, B, C]` in one of three ways (`fill`,
`expand_top_k`; `DEFAULT_FILL` is ``"uniform"``):

* ``"uniform"``: the mass the teacher put outside its top-k at T = 1 is spread evenly over
  the other C - k classes: each gets the logit :math:`\log((1 - \sum_{top k} p) / (C - k))`
  (floored at `TOP_K_FILL`). At T = 1 this is the teacher's distribution with its tail
  flattened (top-k probabilities exact); at T it is that distribution tempered,
  :math:`\tilde p_c \propto p_c^{1/T}` in the top-k and
  :math:`((1 - \sum_{top k} p)/(C-k))^{1/T}` elsewhere. It keeps the tail's total mass,
  which tempering makes large (at T = 4, a teacher with 90% on one of 10 classes and the
  rest spread evenly puts 75% of its tempered mass on the other nine), so the target stays
  close to the online one.
* ``"prior"``: the mass outside the top-k is spread in proportion to a prior `[C]` over the
  classes (e.g. the token frequencies of the training text): class c outside the top-k gets
  :math:`p_c = (1 - \sum_{top k} p)\,\pi_c / (1 - \sum_{top k} \pi)`; with a uniform
  prior it is the uniform fill. (Students of `mtkd lm` distilled from a top-32 cache with
  the token frequencies as the prior were worse than with the uniform fill: numbers in
  docs/results/lm.md.)
* ``"renormalize"``: the top-k classes keep their stored log-probabilities and every other
  class gets `TOP_K_FILL` (-1e4). `softmax_t(z, temperature=T)` of that is exactly the
  teacher's distribution at temperature T **restricted to its top-k classes and
  renormalised**, :math:`\tilde p_c \propto p_c^{1/T}` for c in the top-k and 0 elsewhere
  (0 exactly in float32 for any T < 96, where :math:`e^{-10^4/T}` underflows). Being
  renormalised after tempering, it does not depend on the T used at build time: one cache
  serves every temperature. It is a much sharper target than the tempered teacher.

How students distilled from each fill compare with online targets is measured by
`benchmarks/cache_bench.py`; the numbers are in `benchmarks/RESULTS.md`.

Weightings that read the T = 1 logits (``"confidence"``, CA-MKD) see the reconstructed
logits: with ``"renormalize"`` a teacher whose top-k misses the true label has a
cross-entropy of about :math:`10^4` there, so it gets the smallest weight
(:math:`w_k = (1 - \mathrm{softmax}_k(ce)) / (K - 1)`) instead of a merely smaller one.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.checks import check_float, is_traced

__all__ = [
    "DEFAULT_FILL",
    "FILLS",
    "TOP_K_FILL",
    "TopK",
    "check_fill",
    "check_prior",
    "check_tail_samples",
    "check_top_k",
    "expand_top_k",
    "expand_top_k_host",
    "sample_tail",
    "top_k_of_logits",
]

TOP_K_FILL = -1.0e4
"""Logit given to classes outside a teacher's top-k (finite, so every loss stays finite)."""

FILLS = ("renormalize", "uniform", "prior")
"""Ways to fill the classes outside the top-k when a top-k entry is read back."""

DEFAULT_FILL = "uniform"
"""The fill used when none is given (`expand_top_k`, `open_cache`, `build_cache_in_parallel`)."""


class TopK(NamedTuple):
    """Compact top-k teacher outputs, teacher axis first.

    Numpy arrays in the stored dtypes from `TeacherCache.lookup_top_k`; float32 / int32
    arrays from `top_k_of_logits`.

    Attributes:
      log_probs: `[K, B, k]` log-probabilities at T = 1, descending (stored dtype).
      classes: `[K, B, k]` their class indices (int16 or int32).
      log_rest: `[K, B]` log of the probability outside the top-k (stored dtype).
    """

    log_probs: np.ndarray | jax.Array
    classes: np.ndarray | jax.Array
    log_rest: np.ndarray | jax.Array


# ---------------------------------------------------------------------------------------------
# Argument checks of the cache


def check_fill(fill) -> None:
    """Raise ValueError unless `fill` is one of `FILLS`."""
    if fill not in FILLS:
        raise ValueError(f"`fill` must be one of {FILLS}, got {fill!r}.")


def check_top_k(top_k, num_classes: int) -> None:
    """Raise ValueError unless `top_k` is None or an integer in [1, `num_classes`]."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"`top_k` must be None or an integer in [1, C], got {top_k!r}.")
    if not 1 <= top_k <= num_classes:
        raise ValueError(
            f"`top_k` must be in [1, C={num_classes}] (the number of classes), got {top_k}."
        )


# ---------------------------------------------------------------------------------------------
# Logits -> top-k entries


def top_k_of_logits(logits: jax.Array, *, top_k: int, keep: jax.Array | None = None,
                    tail_samples: int = 0, key: jax.Array | None = None) -> TopK:
    r"""Logits `[..., C]` -> their top-k entry (`TopK` of float32/int32 arrays), jit-safe.

    What `build_cache(top_k=k)` stores, before the cast to the storage dtype.

    Args:
      logits: `[..., C]` logits at T = 1 (any float dtype; computed in float32).
      top_k: k in [1, C].
      keep: optional integer class `[...]` (broadcast against `logits.shape[:-1]`, e.g. the
        label `[B, L]` for teacher logits `[K, B, L, V]`) that the entry must hold: where it
        is not among the k largest, it takes the k-th (smallest) slot. The entry then holds
        the label's exact log-probability, so weightings that read it (``confidence``,
        ``posterior``) see from the cache what they see online. Values outside `[0, C)`
        (padding) are clipped into it.
      tail_samples: m >= 0 more slots that stand for the rest of the distribution, by
        sampling (`sample_tail`): m draws from the teacher's distribution restricted to the
        classes outside the k entries (systematic sampling, one uniform per position from
        `key`), each distinct class drawn c times stored with probability
        :math:`r\,c/m` (r the mass outside the k entries), the unused slots at `TOP_K_FILL`.
        The k + m slots then sum to 1 and, in expectation over `key`, equal the teacher's
        distribution (the top-k alone is biased: it drops the tail). Needs k + m <= C.
      key: PRNG key of the draws (required when `tail_samples` > 0).

    Returns:
      `TopK(log_probs [..., k + m], classes [..., k + m], log_rest [...])`: the k largest
      `log_softmax(logits)` in descending order, floored at `TOP_K_FILL` (the last slot may
      instead hold `keep`), then the m sampled tail slots (m = `tail_samples`); their
      classes (distinct); and the log of the probability the slots do not hold, floored
      at `TOP_K_FILL`: :math:`\log(1 - \sum_{top k} p)` without tail samples (computed
      from the logits outside the entry, not as 1 - sum, so it has no cancellation when
      tiny), and with them only the mass of classes tied with the k-th value but not
      stored (ties are not sampled), usually none.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.cache import top_k_of_logits
      >>> top = top_k_of_logits(jnp.log(jnp.array([0.1, 0.6, 0.3])), top_k=2)
      >>> top.classes.tolist(), [round(v, 3) for v in jnp.exp(top.log_probs).tolist()]
      ([1, 2], [0.6, 0.3])
      >>> round(float(jnp.exp(top.log_rest)), 3)
      0.1
    """
    check_float(logits, "logits")
    if jnp.ndim(logits) < 1:
        raise ValueError(f"`logits` must be [..., C], got shape {jnp.shape(logits)}.")
    check_top_k(top_k, jnp.shape(logits)[-1])
    tail_samples = check_tail_samples(tail_samples, top_k, jnp.shape(logits)[-1])
    if tail_samples and key is None:
        raise ValueError("`tail_samples` > 0 draws classes: pass `key`, a PRNG key.")
    z = jnp.asarray(logits).astype(jnp.float32)
    num_classes = z.shape[-1]
    logp = jax.nn.log_softmax(z, axis=-1)
    log_probs, classes = jax.lax.top_k(logp, top_k)
    swapped = jnp.zeros(log_probs.shape[:-1], bool)
    if keep is not None:
        if not jnp.issubdtype(jnp.result_type(keep), jnp.integer):
            raise TypeError(f"`keep` must hold integer classes, got {jnp.result_type(keep)}.")
        try:
            keep = jnp.broadcast_to(jnp.asarray(keep), log_probs.shape[:-1])
        except ValueError as error:
            raise ValueError(f"`keep` of shape {jnp.shape(keep)} does not broadcast to the "
                             f"logits' batch shape {log_probs.shape[:-1]}.") from error
        keep = jnp.clip(keep, 0, z.shape[-1] - 1).astype(classes.dtype)
        held = jnp.any(classes == keep[..., None], axis=-1, keepdims=True)  # [..., 1]
        # Elementwise selects, no gather or scatter: those are 20x slower on XLA:CPU here.
        kept_lp = jnp.sum(jnp.where(jnp.arange(z.shape[-1]) == keep[..., None], logp, 0.0),
                          axis=-1, keepdims=True)
        swap = (jnp.arange(top_k) == top_k - 1) & ~held  # [..., k]: the last slot, if needed
        classes = jnp.where(swap, keep[..., None], classes)
        log_probs = jnp.where(swap, kept_lp, log_probs)
        swapped = ~held[..., 0]
    # Stored log-probabilities are floored at TOP_K_FILL as the rest is: below it a
    # probability is 0 in float32 anyway, and a class the teacher cannot produce at all (a
    # kept label outside a projected teacher's reach, at -1e9) stays storable in float16.
    stored = jnp.maximum(log_probs, TOP_K_FILL)
    if top_k == num_classes:
        return TopK(stored, classes, jnp.full(log_probs.shape[:-1], TOP_K_FILL))
    # The mass outside the entry, in O(C) per position (a [..., k, C] class comparison costs
    # k times that): the classes below the smallest stored top-ranked value `thr`, plus any
    # tied with `thr` but not stored, minus the kept class when it was swapped in.
    n_top = top_k - swapped.astype(jnp.int32)  # top-ranked classes in the entry
    thr = jnp.where(swapped, log_probs[..., -2] if top_k > 1 else jnp.inf, log_probs[..., -1])
    at_or_above = logp >= thr[..., None]
    out = ~at_or_above
    if keep is not None:
        is_kept = (jnp.arange(num_classes) == keep[..., None]) & swapped[..., None]
        out = out & ~is_kept
        n_ge = jnp.sum(at_or_above & ~is_kept, axis=-1)
    else:
        n_ge = jnp.sum(at_or_above, axis=-1)
    ties = (n_ge - n_top).astype(jnp.float32)  # classes equal to `thr` left out of the entry
    log_out = jax.nn.logsumexp(jnp.where(out, logp, -jnp.inf), axis=-1)
    tie_mass = jnp.where(ties > 0, jnp.log(jnp.maximum(ties, 1.0)) + thr, -jnp.inf)
    if not tail_samples:
        return TopK(stored, classes, jnp.maximum(jnp.logaddexp(log_out, tie_mass), TOP_K_FILL))
    # Unused sample slots take classes of `out` first, then classes tied with `thr` that the
    # entry did not store: lax.top_k stores the lowest-indexed of tied classes, so the
    # highest-indexed come first. Together they are C - k classes, >= m: all distinct.
    tied = logp == thr[..., None]
    if keep is not None:
        tied = tied & ~is_kept
    spare = jnp.where(tied, 0.5 + 0.25 * jnp.arange(num_classes) / num_classes, 0.0)
    u = jax.random.uniform(key, log_out.shape)
    tail = sample_tail(logp, out, log_out, u, tail_samples, spare=spare)
    return TopK(jnp.concatenate([stored, tail.log_probs], axis=-1),
                jnp.concatenate([classes, tail.classes], axis=-1),
                jnp.maximum(tie_mass, TOP_K_FILL))


def check_tail_samples(tail_samples, top_k: int, num_classes: int) -> int:
    """`tail_samples` as an int >= 0 with `top_k` + it <= `num_classes` (else ValueError)."""
    if isinstance(tail_samples, bool) or not isinstance(tail_samples, numbers.Integral) or (
            tail_samples < 0):
        raise ValueError(f"`tail_samples` must be an integer >= 0, got {tail_samples!r}.")
    if tail_samples and top_k + tail_samples > num_classes:
        raise ValueError(f"`top_k` + `tail_samples` ({top_k} + {tail_samples}) must be <= C="
                         f"{num_classes} (the number of classes).")
    return int(tail_samples)


def sample_tail(logp: jax.Array, out: jax.Array, log_out: jax.Array, u: jax.Array,
                num_samples: int, spare: jax.Array | None = None) -> TopK:
    r"""m draws from a distribution restricted to some classes, as m distinct-class slots.

    Systematic sampling: with w the distribution restricted to `out` and renormalised, W its
    cumulative sum over the classes, class c is drawn
    :math:`n_c = \lfloor m W_c + u \rfloor - \lfloor m W_{c-1} + u \rfloor` times, so
    :math:`E_u[n_c] = m w_c` exactly, every class with :math:`m w_c \ge 1` is drawn, and the
    n_c sum to m. Class c's slot holds :math:`\log(r\, n_c / m)`, r = `exp(log_out)` the
    mass of `out`: an unbiased estimate of its probability. O(C) per position (a cumulative
    sum and a top-m, no `[..., m, C]` comparison).

    Args:
      logp: `[..., C]` float32 log-probabilities.
      out: `[..., C]` bool, the classes to draw from.
      log_out: `[...]` log of the probability of `out` (-inf where it holds none).
      u: `[...]` uniforms in [0, 1), one per position.
      num_samples: m >= 1.
      spare: optional `[..., C]` scores in [0, 0.75] of classes outside `out` that may hold
        unused slots when `out` has fewer than m classes (highest first; 0: never before
        the others).

    Returns:
      `TopK(log_probs [..., m], classes [..., m], log_rest [...])`: the drawn classes by
      decreasing count, then unused slots (`TOP_K_FILL`) holding the other classes of
      `out`, then by `spare`; `log_rest` is `TOP_K_FILL` (the m slots hold all of `out`'s
      mass).
    """
    m = num_samples
    has = jnp.isfinite(log_out)
    w = jnp.where(out & has[..., None],
                  jnp.exp(logp - jnp.where(has, log_out, 0.0)[..., None]), 0.0)
    cdf = jnp.cumsum(w, axis=-1)
    cdf = cdf / jnp.maximum(cdf[..., -1:], np.float32(1e-30))  # last exactly 1 (or 0)
    hi = jnp.floor(m * cdf + u[..., None])  # draws up to and including each class
    counts = hi - jnp.concatenate([jnp.zeros_like(hi[..., :1]), hi[..., :-1]], axis=-1)
    # Drawn classes first (by count), then undrawn classes of `out`, then `spare` ones.
    score = 2.0 * counts + out.astype(jnp.float32)
    if spare is not None:
        score = score + jnp.where(out, 0.0, spare)
    score, classes = jax.lax.top_k(score, m)
    drawn = jnp.floor(score / 2.0)
    total = jnp.maximum(hi[..., -1:], 1.0)  # m (m + 1 if m + u rounds up)
    log_probs = jnp.where(drawn > 0,
                          log_out[..., None] + jnp.log(jnp.maximum(drawn, 1.0) / total),
                          TOP_K_FILL)
    log_probs = jnp.maximum(log_probs, TOP_K_FILL)
    return TopK(log_probs, classes, jnp.full(log_out.shape, TOP_K_FILL, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Top-k entries -> logits


def check_prior(prior, num_classes: int, fill: str) -> np.ndarray | None:
    """The float32 log of `prior` (a `[C]` distribution, normalised here) for
    ``fill="prior"``; None for the other fills, which take no prior."""
    if fill != "prior":
        if prior is not None:
            raise ValueError(f"`prior` is for fill='prior', got fill={fill!r}.")
        return None
    if prior is None:
        raise ValueError("fill='prior' needs `prior`, a [C] distribution over the classes.")
    p = np.asarray(prior, np.float64)
    if p.shape != (num_classes,) or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"`prior` must be [C]=({num_classes},) positive finite values, got "
                         f"shape {p.shape}" + (f", range [{p.min()}, {p.max()}]" if p.size
                                               else "") + ".")
    return np.log(p / p.sum()).astype(np.float32)


def _other_logit(xp, log_probs, log_rest, num_classes: int, fill: str, classes=None,
                 log_prior=None):
    """`[..., 1]` float32 logit of the classes outside the top-k (`[..., C]` for the prior
    fill, from the stored `classes` and `log_prior` `[C]`)."""
    k = log_probs.shape[-1]
    if fill == "prior" and k < num_classes:
        log_prior = xp.asarray(log_prior, xp.float32)
        stored = xp.sum(xp.exp(log_prior[xp.asarray(classes)]), axis=-1)  # prior in the top-k
        norm = xp.log(xp.maximum(1.0 - stored, np.float32(1e-30)))
        other = (log_rest.astype(xp.float32) - norm)[..., None] + log_prior
        return xp.maximum(other, np.float32(TOP_K_FILL))
    if fill == "uniform" and k < num_classes:
        other = log_rest.astype(xp.float32)[..., None] - np.float32(np.log(num_classes - k))
        return xp.maximum(other, np.float32(TOP_K_FILL))
    return xp.full(log_probs.shape[:-1] + (1,), TOP_K_FILL, xp.float32)


def expand_top_k_host(top: TopK, num_classes: int, fill: str, log_prior=None) -> np.ndarray:
    """Host version of `expand_top_k` (a numpy scatter), for `TeacherCache.lookup`."""
    log_probs = np.asarray(top.log_probs, np.float32)
    other = _other_logit(np, log_probs, np.asarray(top.log_rest), num_classes, fill,
                         np.asarray(top.classes, np.intp), log_prior)
    out = np.broadcast_to(other, log_probs.shape[:-1] + (num_classes,)).copy()
    np.put_along_axis(out, np.asarray(top.classes, np.intp), log_probs, axis=-1)
    return out


def _check_classes(classes, num_classes: int) -> None:
    """Integer dtype always; range and distinctness when the values are concrete."""
    if not jnp.issubdtype(jnp.result_type(classes), jnp.integer):
        raise TypeError(
            f"`classes` must be integer class indices, got dtype {jnp.result_type(classes)}."
        )
    if is_traced(classes):
        return
    c = np.asarray(classes)
    if c.size and (c.min() < 0 or c.max() >= num_classes):
        raise ValueError(
            f"`classes` must be in [0, num_classes={num_classes}), got range "
            f"[{c.min()}, {c.max()}]."
        )
    s = np.sort(c, axis=-1)
    if np.any(s[..., 1:] == s[..., :-1]):
        raise ValueError("`classes` must be distinct along the last axis (one entry per class).")


def expand_top_k(
    log_probs: jax.Array,
    classes: jax.Array,
    log_rest: jax.Array | None = None,
    *,
    num_classes: int,
    fill: str = DEFAULT_FILL,
    prior: jax.Array | np.ndarray | None = None,
) -> jax.Array:
    """Top-k log-probabilities and class indices -> full logits `[..., C]`, jit-safe.

    The same reconstruction as `TeacherCache.lookup` (see the module docstring), for a step
    that receives the compact arrays of `TeacherCache.lookup_top_k` and expands them on the
    accelerator, moving about k/C of the bytes from the host.

    Args:
      log_probs: `[..., k]` log-probabilities at T = 1 (any float dtype).
      classes: `[..., k]` distinct integer class indices in `[0, C)` (checked when concrete).
      log_rest: `[...]` log of the probability outside the top-k; needed for
        ``fill="uniform"`` (the default) only.
      num_classes: C.
      fill: ``"renormalize"``, ``"uniform"`` or ``"prior"``.
      prior: for ``fill="prior"`` only: `[C]` positive weights of the classes (normalised
        here), concrete (a host array).

    Returns:
      `[..., C]` float32 logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.cache import expand_top_k
      >>> lp, cls = jnp.log(jnp.array([0.6, 0.2])), jnp.array([2, 0])
      >>> z = expand_top_k(lp, cls, jnp.log(0.2), num_classes=4)  # fill="uniform"
      >>> [round(v, 3) for v in jax.nn.softmax(z).tolist()]
      [0.2, 0.1, 0.6, 0.1]
      >>> z = expand_top_k(lp, cls, num_classes=4, fill="renormalize")
      >>> [round(v, 3) for v in jax.nn.softmax(z).tolist()]
      [0.25, 0.0, 0.75, 0.0]
    """
    check_fill(fill)
    num_classes = _checks.check_int(num_classes, "num_classes")
    if jnp.shape(log_probs) != jnp.shape(classes) or jnp.ndim(classes) < 1:
        raise ValueError(
            f"`log_probs` {jnp.shape(log_probs)} and `classes` {jnp.shape(classes)} must have "
            "the same shape [..., k]."
        )
    check_top_k(jnp.shape(log_probs)[-1], num_classes)
    _check_classes(classes, num_classes)
    log_prior = check_prior(prior, num_classes, fill)
    if fill in ("uniform", "prior"):
        if log_rest is None or jnp.shape(log_rest) != jnp.shape(log_probs)[:-1]:
            got = None if log_rest is None else jnp.shape(log_rest)
            raise ValueError(
                f"`fill`={fill!r} needs `log_rest` of shape {jnp.shape(log_probs)[:-1]} (the "
                f"batch shape of `log_probs`), got {got}."
            )
        log_rest = jnp.asarray(log_rest)
    log_probs = jnp.asarray(log_probs, jnp.float32)
    other = _other_logit(jnp, log_probs, log_rest, num_classes, fill, classes, log_prior)
    # A scatter of the k values into the filled row: O(C) memory and work per position (a
    # one-hot select would build `[..., k, C]`: at k = 32, V = 128k, 32x the logits).
    full = jnp.broadcast_to(other, log_probs.shape[:-1] + (num_classes,))
    return jnp.put_along_axis(full, jnp.asarray(classes, jnp.int32), log_probs, axis=-1,
                              inplace=False)
