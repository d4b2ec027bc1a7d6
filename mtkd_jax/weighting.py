"""Teacher weights: how much each teacher counts, overall or per example.

Every strategy returns weights `[K, ...]` (or `[K]` for per-teacher strategies) that are
non-negative and sum to 1 over the leading teacher axis, ready for `fuse_targets`.
Strategies that depend on the data (confidence, entropy, agreement) are per example; the
others broadcast the same `[K]` vector to every example.

Strategies are registered in `WEIGHTINGS` under a name, with the uniform signature
`fn(probs, *, logits, labels) -> [K, ...]`, so training steps can pick one by name.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import _checks
from mtkd_jax.divergence import pairwise_divergence

__all__ = [
    "uniform",
    "static",
    "from_scores",
    "confidence",
    "entropy",
    "agreement",
    "WEIGHTINGS",
    "get_weighting",
]


def uniform(probs: jax.Array) -> jax.Array:
    """Equal weights `1/K` for every teacher and example.

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
    _checks.check_teachers(probs, "probs")
    k = probs.shape[0]
    return jnp.full(probs.shape[:-1], 1.0 / k, dtype=probs.dtype)


def _check_lambdas(lambdas, k: int, name: str) -> jax.Array:
    lam = jnp.asarray(lambdas)
    if lam.shape != (k,):
        raise ValueError(f"`{name}` must have shape [K]=({k},), one per teacher; got {lam.shape}.")
    if not jnp.issubdtype(lam.dtype, jnp.floating):
        lam = lam.astype(jnp.float32)
    if not _checks.is_traced(lam):
        # Concrete values: refuse what cannot be normalised. Traced lambdas cannot be checked
        # without a host sync, so they are the caller's responsibility.
        if not bool(jnp.all(jnp.isfinite(lam))):
            raise ValueError(f"`{name}` must be finite, got {lam}.")
        if bool(jnp.any(lam < 0)):
            raise ValueError(f"`{name}` must be non-negative, got {lam}.")
        if not bool(jnp.sum(lam) > 0):
            raise ValueError(f"`{name}` must not be all zero, got {lam}.")
    return lam


def static(lambdas: jax.Array, probs: jax.Array) -> jax.Array:
    r"""User-given per-teacher weights, normalised: :math:`w_k = \lambda_k / \sum_j \lambda_j`.

    Args:
      lambdas: `[K]` non-negative, not all zero.
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).

    Returns:
      `[K, ...]` weights, the normalised lambdas broadcast over the batch dims.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> weighting.static(jnp.array([1.0, 3.0]), jnp.ones((2, 5, 3)) / 3)[:, 0]
      Array([0.25, 0.75], dtype=float32)
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs")
    lam = _check_lambdas(lambdas, k, "lambdas")
    w = (lam / jnp.sum(lam)).astype(probs.dtype)
    return jnp.broadcast_to(w.reshape((k,) + (1,) * (probs.ndim - 2)), probs.shape[:-1])


def from_scores(
    scores: jax.Array, probs: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    r"""Performance-based weights (the article's :math:`\lambda_i`): softmax of scores.

    :math:`w_k = \exp(s_k / \tau) / \sum_j \exp(s_j / \tau)`, with scores such as validation
    accuracies. A small :math:`\tau` concentrates weight on the best teacher; a large one tends
    to uniform.

    Args:
      scores: `[K]` per-teacher scores, higher is better.
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      temperature: :math:`\tau > 0`.

    Returns:
      `[K, ...]` weights.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> w = weighting.from_scores(jnp.array([0.9, 0.9, 0.8]), jnp.ones((3, 1, 2)) / 2,
      ...                           temperature=0.1)
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.422, 0.422, 0.155]
    """
    probs = jnp.asarray(probs)
    k = _checks.check_teachers(probs, "probs")
    _checks.check_temperature(temperature)
    s = jnp.asarray(scores)
    if s.shape != (k,):
        raise ValueError(f"`scores` must have shape [K]=({k},), one per teacher; got {s.shape}.")
    w = jax.nn.softmax(s.astype(probs.dtype) / temperature)
    return jnp.broadcast_to(w.reshape((k,) + (1,) * (probs.ndim - 2)), probs.shape[:-1])


def confidence(teacher_logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Confidence-aware weights of CA-MKD (Zhang, Chen & Wang, ICASSP 2022).

    With :math:`ce_k` the cross-entropy of teacher k's logits against the true label,
    :math:`w_k = (1 - \mathrm{softmax}_k(ce)) / (K - 1)`: a teacher that is more right about
    this example counts more. For K = 1 the single teacher gets weight 1.

    Args:
      teacher_logits: `[K, ..., C]` raw teacher logits (temperature 1, as in CA-MKD).
      labels: `[...]` integer labels in `[0, C)`.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.array([[[4.0, 0.0]], [[0.0, 0.0]]])   # teacher 0 is sure of class 0
      >>> w = weighting.confidence(z, jnp.array([0]))
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.663, 0.337]
    """
    teacher_logits, labels = jnp.asarray(teacher_logits), jnp.asarray(labels)
    k = _checks.check_teachers(teacher_logits, "teacher_logits")
    _checks.check_labels(labels, "labels", teacher_logits.shape[1:-1])
    logp = jax.nn.log_softmax(teacher_logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[None, ..., None], axis=-1)[..., 0]
    if k == 1:
        return jnp.ones_like(ce)
    return (1.0 - jax.nn.softmax(ce, axis=0)) / (k - 1)


def _entropy(probs: jax.Array) -> jax.Array:
    safe = jnp.where(probs > 0, probs, 1.0)
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe), 0.0), axis=-1)


def entropy(probs: jax.Array) -> jax.Array:
    r"""Entropy-based weights (EBKD, as CA-MKD's code uses it).

    With :math:`H_k` the entropy of teacher k's prediction,
    :math:`w_k = (1 - H_k / \sum_j H_j) / (K - 1)`: confident (low-entropy) teachers count
    more. Where every teacher is one-hot (all H = 0) the weights fall back to uniform.

    Args:
      probs: `[K, ..., C]` teacher probabilities.

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
    h = _entropy(probs)
    if k == 1:
        return jnp.ones_like(h)
    total = jnp.sum(h, axis=0, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    w = (1.0 - h / safe_total) / (k - 1)
    return jnp.where(total > 0, w, 1.0 / k)


def agreement(probs: jax.Array, *, kind: str = "squared", sharpness: float = 1.0) -> jax.Array:
    r"""Weights from agreement with the other teachers (from the article's differences).

    :math:`w_k = \mathrm{softmax}_k(-s \cdot \bar D_k)` with
    :math:`\bar D_k = \frac{1}{K-1} \sum_{j \ne k} D_{kj}` and D from `pairwise_divergence`,
    so a teacher that disagrees with the rest counts less; `sharpness` s = 0 gives uniform.
    Needs K >= 2.

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


def _confidence_by_name(probs, *, logits=None, labels=None):
    if logits is None or labels is None:
        raise ValueError(
            "weighting 'confidence' needs `logits` ([K, ..., C] teacher logits) and `labels` "
            "([...] integer labels)."
        )
    return confidence(logits, labels)


WEIGHTINGS: dict[str, Callable[..., jax.Array]] = {
    "uniform": lambda probs, *, logits=None, labels=None: uniform(probs),
    "confidence": _confidence_by_name,
    "entropy": lambda probs, *, logits=None, labels=None: entropy(probs),
    "agreement": lambda probs, *, logits=None, labels=None: agreement(probs),
}
"""Name -> `fn(probs [K, ..., C], *, logits [K, ..., C], labels [...]) -> [K, ...]`.

`static` and `from_scores` need per-teacher numbers, so they are built with
`get_weighting("static", lambdas=...)` or `get_weighting("scores", scores=...)`.
"""

# Hyperparameters each name accepts in `get_weighting`: (required, optional).
_HYPERPARAMETERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "static": (frozenset({"lambdas"}), frozenset()),
    "scores": (frozenset({"scores"}), frozenset({"temperature"})),
    "agreement": (frozenset(), frozenset({"kind", "sharpness"})),
}


def get_weighting(name_or_fn, **kwargs) -> Callable[..., jax.Array]:
    """Resolve a weighting strategy to `fn(probs, *, logits, labels) -> [K, ...]`.

    Args:
      name_or_fn: a name in `WEIGHTINGS`, ``"static"`` (needs `lambdas=[K]`), ``"scores"``
        (needs `scores=[K]`, optional `temperature`), ``"agreement"`` (optional `kind`,
        `sharpness`), or a callable with the uniform signature, returned as is.
      **kwargs: the strategy's hyperparameters; any other keyword is an error, so a typo
        cannot be silently ignored.

    Returns:
      A function of `(probs, *, logits, labels)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.weighting import get_weighting
      >>> fn = get_weighting("static", lambdas=jnp.array([1.0, 1.0, 2.0]))
      >>> fn(jnp.ones((3, 1, 4)) / 4, logits=None, labels=None)[:, 0]
      Array([0.25, 0.25, 0.5 ], dtype=float32)
    """
    if callable(name_or_fn):
        if kwargs:
            raise ValueError(
                f"a callable weighting is returned as is and takes no hyperparameters; got "
                f"{sorted(kwargs)}."
            )
        return name_or_fn
    names = sorted({*WEIGHTINGS, *_HYPERPARAMETERS})
    if not isinstance(name_or_fn, str) or name_or_fn not in names:
        raise ValueError(f"Unknown weighting {name_or_fn!r}; valid names: {names}.")
    required, optional = _HYPERPARAMETERS.get(name_or_fn, (frozenset(), frozenset()))
    missing, unknown = required - kwargs.keys(), kwargs.keys() - required - optional
    if missing or unknown:
        raise ValueError(
            f"weighting {name_or_fn!r} needs {sorted(required)} and accepts {sorted(optional)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}."
        )
    if name_or_fn == "static":
        lambdas = kwargs["lambdas"]
        return lambda probs, *, logits=None, labels=None: static(lambdas, probs)
    if name_or_fn == "scores":
        scores, temp = kwargs["scores"], kwargs.get("temperature", 1.0)
        return lambda probs, *, logits=None, labels=None: from_scores(
            scores, probs, temperature=temp
        )
    if name_or_fn == "agreement" and kwargs:
        return lambda probs, *, logits=None, labels=None: agreement(probs, **kwargs)
    return WEIGHTINGS[name_or_fn]
