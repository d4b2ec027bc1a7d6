"""Teacher softmaxes with temperature and pairwise divergence matrices between teachers.

Shapes: K teachers, any batch dims `...`, C classes; the teacher axis comes first.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.precision import at_least_float32

__all__ = ["softmax_t", "log_softmax_t", "pairwise_divergence", "DIVERGENCES"]


def softmax_t(logits: jax.Array, *, temperature: float | jax.Array = 1.0) -> jax.Array:
    r"""Softmax of `logits / temperature` over the last axis.

    `p = softmax(z / T)`; larger T gives softer distributions (Hinton et al., 2015).

    Args:
      logits: `[..., C]` floating logits (e.g. teacher logits `[K, B, C]`); narrower than
        float32 (bfloat16) they are upcast, so the result is float32.
      temperature: T > 0, a Python number or a scalar array.

    Returns:
      `[..., C]` probabilities summing to 1 over the last axis.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import softmax_t
      >>> softmax_t(jnp.array([0.0, 0.0, jnp.log(2.0)]), temperature=1.0).round(2)
      Array([0.25, 0.25, 0.5 ], dtype=float32)
    """
    logits = jnp.asarray(logits)
    _checks.check_float(logits, "logits")
    logits = at_least_float32(logits)  # bfloat16 logits: the softmax in float32
    _checks.check_temperature(temperature)
    z = logits / temperature
    # exp(z - logsumexp(z)) rather than exp(z - max) / sum: one elementwise pass after the two
    # row reductions, so no unnormalised `[..., C]` array is held beside the result (at a
    # large vocabulary that is one more `[K, B, c, V]` buffer per chunk of the loss).
    return jnp.exp(z - jax.nn.logsumexp(z, axis=-1, keepdims=True))


def log_softmax_t(logits: jax.Array, *, temperature: float | jax.Array = 1.0) -> jax.Array:
    """`log softmax(logits / temperature)` over the last axis, `[..., C] -> [..., C]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.divergence import log_softmax_t
      >>> jnp.exp(log_softmax_t(jnp.array([1.0, 1.0]), temperature=2.0))
      Array([0.5, 0.5], dtype=float32)
    """
    logits = jnp.asarray(logits)
    _checks.check_float(logits, "logits")
    logits = at_least_float32(logits)
    _checks.check_temperature(temperature)
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _xlogy_ratio(p: jax.Array, q: jax.Array) -> jax.Array:
    """`p * (log p - log q)` elementwise, 0 where p == 0, finite where q == 0 < p.

    Zeros in q are clipped to the float's tiny value so that a teacher which gives exactly 0 to
    a class another teacher believes in yields a large but finite KL instead of inf. The
    `where` on both branches keeps the gradient finite (no 0 * inf = NaN).
    """
    tiny = jnp.finfo(jnp.result_type(p, q)).tiny
    safe_p = jnp.where(p > 0, p, 1.0)
    safe_q = jnp.maximum(q, tiny)
    return jnp.where(p > 0, p * (jnp.log(safe_p) - jnp.log(safe_q)), 0.0)


def _squared(pi: jax.Array, pj: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(pi - pj), axis=-1)


def _euclidean(pi: jax.Array, pj: jax.Array) -> jax.Array:
    sq = _squared(pi, pj)
    # sqrt has an infinite derivative at 0 (the diagonal); route the gradient through a safe
    # value there and return exact zeros.
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def _kl(pi: jax.Array, pj: jax.Array) -> jax.Array:
    return jnp.sum(_xlogy_ratio(pi, pj), axis=-1)


def _js(pi: jax.Array, pj: jax.Array) -> jax.Array:
    m = 0.5 * (pi + pj)
    return 0.5 * jnp.sum(_xlogy_ratio(pi, m) + _xlogy_ratio(pj, m), axis=-1)


DIVERGENCES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "squared": _squared,
    "euclidean": _euclidean,
    "kl": _kl,
    "js": _js,
}
"""Registry of pairwise divergences `f(p_i [..., C], p_j [..., C]) -> [...]`."""


def pairwise_divergence(probs: jax.Array, *, kind: str = "squared") -> jax.Array:
    r"""Divergence between every pair of teachers' predictions.

    Kinds (over classes m):

    * ``"squared"``: :math:`d_{ij} = \sum_m (p_{im} - p_{jm})^2` (the article's difference);
    * ``"euclidean"``: :math:`\sqrt{d_{ij}}`;
    * ``"kl"``: :math:`KL(p_i \| p_j) = \sum_m p_{im} (\log p_{im} - \log p_{jm})`, not
      symmetric; zeros in p_j are clipped to the dtype's tiny value, so the result is finite;
    * ``"js"``: Jensen-Shannon, :math:`\tfrac12 KL(p_i\|m) + \tfrac12 KL(p_j\|m)`,
      :math:`m = (p_i + p_j)/2`, symmetric and bounded by log 2.

    Args:
      probs: `[K, ..., C]` teacher probabilities, teacher axis first.
      kind: one of `DIVERGENCES` (static).

    Returns:
      `[..., K, K]` with entry `[..., i, j] = D(p_i, p_j)`, zero on the diagonal.

    Example (the article's worked example, d_AB = 0.02):
      >>> import jax.numpy as jnp
      >>> from mtkd_jax import pairwise_divergence
      >>> p = jnp.array([[0.2, 0.3, 0.5], [0.1, 0.4, 0.5]])
      >>> pairwise_divergence(p, kind="squared").round(4)
      Array([[0.  , 0.02],
             [0.02, 0.  ]], dtype=float32)
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"`kind` must be one of {sorted(DIVERGENCES)}, got {kind!r}.")
    probs = jnp.asarray(probs)
    _checks.check_teachers(probs, "probs", min_teachers=2)
    fn = DIVERGENCES[kind]
    # [K, 1, ..., C] against [1, K, ..., C] -> [K, K, ...]; K is small (2-10) so the K^2 C
    # intermediate is cheap next to the teachers' forward passes.
    d = fn(probs[:, None], probs[None, :])
    k = probs.shape[0]
    d = d * (1.0 - jnp.eye(k, dtype=d.dtype)).reshape((k, k) + (1,) * (d.ndim - 2))
    return jnp.moveaxis(d, (0, 1), (-2, -1))
