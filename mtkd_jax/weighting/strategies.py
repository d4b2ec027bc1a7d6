r"""The built-in weighting strategies, each a function of the protocol's signature.

See `mtkd_jax.weighting` for the protocol and the registry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.divergence import pairwise_divergence
from mtkd_jax.core.reduce import expand_to

__all__ = ["uniform", "static", "from_scores", "confidence", "entropy", "agreement", "posterior"]


def _per_teacher(w: jax.Array, probs: jax.Array) -> jax.Array:
    """`[K]` weights broadcast to `[K, ...]`, the leading dims of probs `[K, ..., C]`."""
    return jnp.broadcast_to(expand_to(w, probs.ndim - 1), probs.shape[:-1])


def uniform(probs: jax.Array, *, logits=None, labels=None, label_mask=None) -> jax.Array:
    """Equal weights `1/K` for every teacher and example (the plain mean target).

    Labels are not used. Bounds: exactly `1/K`; with teachers from different sources
    (`mtkd_jax.core.class_sets`) this is the naive ensemble, blind to which teacher knows the input.

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).

    Returns:
      `[K, ...]` weights, all `1/K`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> weighting.uniform(jnp.ones((4, 2, 3)) / 3)[:, 0]
      Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs")
    return jnp.full(probs.shape[:-1], 1.0 / k, dtype=probs.dtype)


def _check_per_teacher(values, k: int, name: str) -> None:
    """Host-side checks of a concrete `[K]` hyperparameter (NumPy, never jnp: jit-safe)."""
    if jnp.shape(values) != (k,):
        raise ValueError(
            f"`{name}` must have shape [K]=({k},), one per teacher; got {jnp.shape(values)}."
        )
    if _checks.is_traced(values):
        return
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` must be finite, got {v.tolist()}.")


def static(
    probs: jax.Array, *, lambdas, logits=None, labels=None, label_mask=None
) -> jax.Array:
    r"""User-given per-teacher weights, normalised: :math:`w_k = \lambda_k / \sum_j \lambda_j`.

    The same for labeled and unlabeled examples. Bounds: any point of the simplex, but the
    same for every example (it cannot route an input to the teacher that knows it).

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      lambdas: `[K]` non-negative, not all zero.

    Returns:
      `[K, ...]` weights, the normalised lambdas broadcast over the batch dims.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> weighting.static(jnp.ones((2, 5, 3)) / 3, lambdas=jnp.array([1.0, 3.0]))[:, 0]
      Array([0.25, 0.75], dtype=float32)
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs")
    _check_per_teacher(lambdas, k, "lambdas")
    if not _checks.is_traced(lambdas):
        lam = np.asarray(lambdas, dtype=np.float64)
        if np.any(lam < 0):
            raise ValueError(f"`lambdas` must be non-negative, got {lam.tolist()}.")
        if not lam.sum() > 0:
            raise ValueError(f"`lambdas` must not be all zero, got {lam.tolist()}.")
    lam = jnp.asarray(lambdas, probs.dtype)
    return _per_teacher(lam / jnp.sum(lam), probs)


def from_scores(
    probs: jax.Array,
    *,
    scores,
    temperature: float | jax.Array = 1.0,
    logits=None,
    labels=None,
    label_mask=None,
) -> jax.Array:
    r"""Performance-based weights (the article's :math:`\lambda_i`): softmax of scores.

    :math:`w_k = \exp(s_k / \tau) / \sum_j \exp(s_j / \tau)`, with scores such as validation
    accuracies. A small :math:`\tau` concentrates weight on the best teacher; a large one tends
    to uniform. The same for labeled and unlabeled examples. Bounds: in (0, 1), the same for
    every example (as ``static``).

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      scores: `[K]` per-teacher scores, higher is better.
      temperature: :math:`\tau > 0`.

    Returns:
      `[K, ...]` weights.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> w = weighting.from_scores(jnp.ones((3, 1, 2)) / 2, scores=jnp.array([0.9, 0.9, 0.8]),
      ...                           temperature=0.1)
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.422, 0.422, 0.155]
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs")
    _checks.check_temperature(temperature)
    _check_per_teacher(scores, k, "scores")
    w = jax.nn.softmax(jnp.asarray(scores, probs.dtype) / temperature)
    return _per_teacher(w, probs)


def _needs_logits(probs, logits, name: str):
    """(probs, logits, K) as arrays, for a strategy that needs the raw teacher logits."""
    if logits is None:
        raise ValueError(
            f"weighting {name!r} needs `logits`, the raw teacher logits [K, ..., C]."
        )
    probs, logits = jnp.asarray(probs), jnp.asarray(logits)
    k = _checks.check_teachers(logits, "logits")
    if probs.shape != logits.shape:
        raise ValueError(
            f"`probs` {probs.shape} and `logits` {logits.shape} must have the same shape."
        )
    return probs, logits, k


def _known_labels(logits, labels, label_mask):
    """True labels where known; the ensemble's argmax (mean of softmax(logits)) elsewhere."""
    ensemble = jnp.argmax(jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0), axis=-1)
    if labels is None:
        return ensemble.astype(jnp.int32)
    _checks.check_labels(labels, "labels", logits.shape[1:-1])
    if label_mask is None:
        return labels
    if jnp.shape(label_mask) != jnp.shape(labels):
        raise ValueError(
            f"`label_mask` must have the shape of `labels` {jnp.shape(labels)}, got "
            f"{jnp.shape(label_mask)}."
        )
    return jnp.where(jnp.asarray(label_mask) > 0, labels, ensemble.astype(labels.dtype))


def confidence(
    probs: jax.Array, *, logits: jax.Array | None = None, labels=None, label_mask=None
) -> jax.Array:
    r"""Confidence-aware weights of CA-MKD (Zhang, Chen & Wang, ICASSP 2022).

    With :math:`ce_k` the cross-entropy of teacher k's raw logits (T = 1, as in CA-MKD)
    against the label, :math:`w_k = (1 - \mathrm{softmax}_k(ce)) / (K - 1)`: a teacher that is
    more right about this example counts more. For K = 1 the single teacher gets weight 1.

    Unlabeled examples (no `labels`, or `label_mask` 0) use the teacher ensemble's argmax
    (mean of the T = 1 probabilities) as their label, so their weights favour the teachers
    that agree with the ensemble, and their fused target has the ensemble's argmax.

    Bound: no teacher ever gets more than :math:`1/(K-1)` (at K = 3, 0.5), however sure it is,
    and the weights sum to 1. So teachers that give the label probability 0 (a class they do
    not know, `mtkd_jax.core.class_sets`) get weight 0 on a labeled example only when there is
    one such teacher. With m of them, their cross-entropies (about :math:`-`
    `UNKNOWN_LOGIT` = 1e9, equal in float32) share the softmax: each gets
    :math:`(1 - 1/m)/(K-1)` (at K = 3, m = 2: 0.25, beside 0.5 for the teacher that knows
    the label). That is CA-MKD's definition, kept as is; the strategies that can give such
    teachers (almost) nothing are the routing ones (`mtkd_jax.weighting.routing`).

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is checked).
      logits: `[K, ..., C]` raw teacher logits (required).
      labels: optional `[...]` integer labels in `[0, C)`.
      label_mask: optional `[...]`, 1 where `labels` hold a label.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.array([[[4.0, 0.0]], [[0.0, 0.0]]])   # teacher 0 is sure of class 0
      >>> w = weighting.confidence(jax.nn.softmax(z), logits=z, labels=jnp.array([0]))
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.663, 0.337]
    """
    probs, logits, k = _needs_logits(probs, logits, "confidence")
    y = _known_labels(logits, labels, label_mask)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, y[None, ..., None], axis=-1)[..., 0]
    if k == 1:
        return jnp.ones_like(ce)
    return (1.0 - jax.nn.softmax(ce, axis=0)) / (k - 1)


def _entropy(probs: jax.Array) -> jax.Array:
    safe = jnp.where(probs > 0, probs, 1.0)
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe), 0.0), axis=-1)


def entropy(
    probs: jax.Array, *, logits: jax.Array | None = None, labels=None, label_mask=None
) -> jax.Array:
    r"""Entropy-based weights (EBKD, as CA-MKD's code computes them).

    With :math:`H_k` the entropy of teacher k's prediction at T = 1 (`softmax(logits)`, as
    EBKD does; from `probs` only when no `logits` are given),
    :math:`w_k = (1 - H_k / \sum_j H_j) / (K - 1)`: confident (low-entropy) teachers count
    more. Where every teacher is one-hot (all H = 0) the weights fall back to uniform. Labels
    are not used: labeled and unlabeled examples are weighted alike.

    Bound: no teacher ever gets more than :math:`1/(K-1)`, so it cannot route an input to
    one teacher (see `mtkd_jax.weighting.routing` for strategies that can).

    Args:
      probs: `[K, ..., C]` teacher probabilities.
      logits: optional `[K, ..., C]` raw teacher logits (then the entropy is taken at T = 1).

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> p = jnp.array([[[0.9, 0.1]], [[0.5, 0.5]]])
      >>> [round(x, 3) for x in weighting.entropy(p)[:, 0].tolist()]
      [0.681, 0.319]
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs")
    if logits is not None:
        logits = jnp.asarray(logits)
        if logits.shape != probs.shape:
            raise ValueError(
                f"`probs` {probs.shape} and `logits` {logits.shape} must have the same shape."
            )
        probs = jax.nn.softmax(logits, axis=-1)
    h = _entropy(probs)
    if k == 1:
        return jnp.ones_like(h)
    total = jnp.sum(h, axis=0, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    # Under jit, XLA may round h / total of the teacher holding all the entropy to just
    # above 1 (seen: w = -1.8e-9): clip, so the weights stay non-negative.
    w = jnp.maximum(1.0 - h / safe_total, 0.0) / (k - 1)
    return jnp.where(total > 0, w, 1.0 / k)


def agreement(
    probs: jax.Array,
    *,
    kind: str = "squared",
    sharpness: float = 1.0,
    logits=None,
    labels=None,
    label_mask=None,
) -> jax.Array:
    r"""Weights from agreement with the other teachers (from the article's differences).

    :math:`w_k = \mathrm{softmax}_k(-s \cdot \bar D_k)` with
    :math:`\bar D_k = \frac{1}{K-1} \sum_{j \ne k} D_{kj}` and D from `pairwise_divergence`
    of `probs`, so a teacher that disagrees with the rest counts less; `sharpness` s = 0 gives
    uniform. Labels are not used: the same with and without labels. Needs K >= 2.

    Bounds: below 1 for finite s. With K = 2 and a symmetric kind the two mean divergences
    are equal, so the weights are always uniform; with teachers that know different classes
    it favours the majority, not the teacher that knows the input.

    Args:
      probs: `[K, ..., C]` teacher probabilities.
      kind: divergence kind, see `pairwise_divergence`.
      sharpness: s >= 0.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> p = jnp.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.1, 0.9]]])  # teacher 2 dissents
      >>> [round(x, 3) for x in weighting.agreement(p, sharpness=2.0)[:, 0].tolist()]
      [0.366, 0.494, 0.14]
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs", min_teachers=2)
    if not _checks.is_traced(sharpness) and not bool(np.all(np.asarray(sharpness) >= 0)):
        raise ValueError(f"`sharpness` must be >= 0, got {sharpness}.")
    d = pairwise_divergence(probs, kind=kind)  # [..., K, K], zero diagonal
    mean_d = jnp.sum(d, axis=-1) / (k - 1)  # [..., K]
    w = jax.nn.softmax(-sharpness * mean_d, axis=-1)
    return jnp.moveaxis(w, -1, 0)


def posterior(
    probs: jax.Array,
    *,
    sharpness: float = 1.0,
    logits: jax.Array | None = None,
    labels=None,
    label_mask=None,
) -> jax.Array:
    r"""Each teacher's posterior probability of having produced the label (a per-example router).

    :math:`w_k = \mathrm{softmax}_k(s \cdot \log p_k(y))` with :math:`p_k` teacher k's
    softmax of its raw logits (T = 1): with `sharpness` s = 1 this is Bayes' rule for "which
    teacher generated y" under a uniform prior, the E-step of a mixture of experts (Jacobs et
    al. 1991). Unlike ``confidence`` (bounded by 1/(K-1)) it routes: a teacher that gives the
    label far more probability than the others gets a weight near 1. s = 0 gives uniform;
    larger s routes harder. In language modelling the label of every token is known (the next
    token), so this is the per-token router of the ``mtkd lm`` experiment.

    Unlabeled examples (no `labels`, or `label_mask` 0) get uniform weights: no evidence.

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is checked).
      sharpness: s >= 0.
      logits: `[K, ..., C]` raw teacher logits (required).
      labels: `[...]` integer labels in `[0, C)`.
      label_mask: optional `[...]`, 1 where `labels` hold a label.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.array([[[4.0, 0.0]], [[0.0, 0.0]]])   # teacher 0 is sure of class 0
      >>> w = weighting.posterior(jax.nn.softmax(z), logits=z, labels=jnp.array([0]))
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.663, 0.337]
    """
    probs, logits, k = _needs_logits(probs, logits, "posterior")
    if not _checks.is_traced(sharpness) and not bool(np.all(np.asarray(sharpness) >= 0)):
        raise ValueError(f"`sharpness` must be >= 0, got {sharpness}.")
    if labels is None:
        return jnp.full(logits.shape[:-1], 1.0 / k, dtype=probs.dtype)
    _checks.check_labels(labels, "labels", logits.shape[1:-1])
    y = jnp.asarray(labels)
    logp = jax.nn.log_softmax(logits, axis=-1)
    log_py = jnp.take_along_axis(logp, y[None, ..., None], axis=-1)[..., 0]  # [K, ...]
    evidence = sharpness * log_py
    if label_mask is not None:
        if jnp.shape(label_mask) != jnp.shape(labels):
            raise ValueError(
                f"`label_mask` must have the shape of `labels` {jnp.shape(labels)}, got "
                f"{jnp.shape(label_mask)}."
            )
        evidence = jnp.where(jnp.asarray(label_mask)[None] > 0, evidence, 0.0)
    return jax.nn.softmax(evidence, axis=0).astype(probs.dtype)
