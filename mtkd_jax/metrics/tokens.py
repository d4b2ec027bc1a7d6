"""Token-level metrics of a sequence model from additive statistics over valid tokens.

The sequence counterpart of `mtkd_jax.metrics`: `TokenStats` are sums (NLL, correct and
agreeing tokens, counts) that add exactly across batches and devices (`merge_stats` works
on them too, as does `jax.lax.psum`); `compute_token_metrics` turns them into per-token
accuracy, NLL, perplexity and agreement with a reference (e.g. the teacher ensemble) once at
the end. Padding (mask 0) counts nowhere. No `[V, V]` confusion matrix is kept: at a
vocabulary of 32k it would not fit.

Shapes: B sequences of L tokens over a vocabulary of V.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.argmax import is_argmax

__all__ = ["TokenStats", "token_stats", "compute_token_metrics"]


class TokenStats(NamedTuple):
    """Additive statistics over valid tokens.

    Attributes:
      nll_sum: `[]` float32, summed negative log-likelihood of the true tokens.
      correct: `[]` int32, tokens whose argmax is the true token.
      agree: `[]` int32, tokens whose argmax matches the reference distribution's argmax.
      agree_n: `[]` int32, tokens compared with a reference (0 when none was given).
      n: `[]` int32, valid tokens counted.
    """

    nll_sum: jax.Array
    correct: jax.Array
    agree: jax.Array
    agree_n: jax.Array
    n: jax.Array


def token_stats(
    logits: jax.Array,
    labels: jax.Array,
    *,
    reference_probs: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> TokenStats:
    """Statistics of one batch of sequences.

    Args:
      logits: `[B, L, V]` logits (or log-probabilities).
      labels: `[B, L]` int tokens in `[0, V)`; entries where `mask` is 0 may hold anything.
      reference_probs: optional `[B, L, V]` distribution to measure agreement with.
      mask: optional `[B, L]`, 1 for real tokens and 0 for padding.

    Returns:
      `TokenStats`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.metrics.tokens import token_stats, compute_token_metrics
      >>> z = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]]]))
      >>> m = compute_token_metrics(token_stats(z, jnp.array([[0, 0, 0]]),
      ...                                       mask=jnp.array([[1, 1, 0]])))
      >>> float(m["accuracy"]), round(float(m["perplexity"]), 4), int(m["n"])
      (1.0, 1.4907, 2)
    """
    _checks.check_float(logits, "logits")
    if jnp.ndim(logits) != 3:
        raise ValueError(f"`logits` must have shape [B, L, V], got {jnp.shape(logits)}.")
    lead = tuple(logits.shape[:2])
    _checks.check_labels(labels, "labels", lead)
    if mask is None:
        valid = jnp.ones(lead, bool)
    else:
        if tuple(jnp.shape(mask)) != lead:
            raise ValueError(f"`mask` must have shape [B, L]={lead}, got {jnp.shape(mask)}.")
        valid = jnp.asarray(mask) > 0
    y = jnp.where(valid, labels, 0)  # padding may hold placeholder tokens
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    vi = valid.astype(jnp.int32)
    if reference_probs is None:
        agree = agree_n = jnp.zeros((), jnp.int32)
    else:
        _checks.check_float(reference_probs, "reference_probs")
        if jnp.shape(reference_probs) != logits.shape:
            raise ValueError(
                f"`reference_probs` must have the shape of `logits` {logits.shape}, got "
                f"{jnp.shape(reference_probs)}."
            )
        agree = jnp.sum((is_argmax(logp, jnp.argmax(reference_probs, axis=-1)) & valid).astype(
            jnp.int32))
        agree_n = jnp.sum(vi)
    return TokenStats(
        nll_sum=jnp.sum(jnp.where(valid, nll, 0.0)),
        correct=jnp.sum((is_argmax(logp, y) & valid).astype(jnp.int32)),
        agree=agree,
        agree_n=agree_n,
        n=jnp.sum(vi),
    )


def compute_token_metrics(stats: TokenStats) -> dict[str, jax.Array]:
    r"""Per-token metrics from accumulated `TokenStats`.

    * ``accuracy``: correct tokens / valid tokens.
    * ``nll``: mean negative log-likelihood per valid token (nats).
    * ``perplexity``: :math:`\exp(\text{nll})`.
    * ``agreement``: fraction of tokens whose argmax matches the reference's; NaN without one.
    * ``n``: valid tokens.

    With n = 0 accuracy and nll are 0 (perplexity 1).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.metrics.tokens import TokenStats, compute_token_metrics
      >>> s = TokenStats(*map(jnp.asarray, (2.0, 1, 0, 0, 2)))
      >>> round(float(compute_token_metrics(s)["perplexity"]), 4)
      2.7183
    """
    n = jnp.asarray(stats.n, jnp.float32)
    safe = jnp.maximum(n, 1.0)
    nll = jnp.where(n > 0, stats.nll_sum / safe, 0.0)
    agreement = jnp.where(
        stats.agree_n > 0, stats.agree / jnp.maximum(stats.agree_n, 1).astype(jnp.float32),
        jnp.nan,
    )
    return {
        "accuracy": jnp.where(n > 0, stats.correct / safe, 0.0),
        "nll": nll,
        "perplexity": jnp.exp(nll),
        "agreement": agreement,
        "n": stats.n,
    }
