r"""Label-free routing: per-example weights from what each teacher can tell from the input.

When teachers come from different sources (different shards of the data, or different
classes, `mtkd_jax.core.class_sets`), the right teacher for an input is the one whose training
data looked like it. These strategies estimate that from each teacher's own logits, with no
label, so they weight labeled and unlabeled (transfer-set) examples alike:

* ``energy``: the teacher's free energy, :math:`\log \sum_c e^{z_{kc}}` (an in-distribution
  score, Liu et al. 2020);
* ``max_logit``: its largest logit (Hendrycks et al. 2022);
* ``calibrated``: its calibrated confidence, the largest temperature-scaled probability
  (Hendrycks & Gimpel 2017; Guo et al. 2017), temperatures fitted on each teacher's own
  validation data with `fit_temperature`;
* ``gate`` (`mtkd_jax.weighting.gate`): a small network over all the teachers' outputs,
  fitted on labeled examples as a mixture of experts (`fit_gate`; Jacobs et al. 1991).

All take optional per-teacher `temperatures` `[K]` (:math:`\tau_k`, from `fit_temperature`):
teachers trained separately have logits of different scales, and dividing by the fitted
temperature puts them on one scale. Unlike ``confidence`` and ``entropy`` (at most
:math:`1/(K-1)` each), these can give one teacher all the weight.

References:
  Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.
  Hendrycks, Basart, Mazeika et al., "Scaling Out-of-Distribution Detection for Real-World
  Settings", ICML 2022 (MaxLogit).
  Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
  Examples in Neural Networks", ICLR 2017.
  Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.class_sets import UNKNOWN_LOGIT, check_known

__all__ = ["energy", "max_logit", "calibrated", "fit_temperature"]


def _scaled_logits(logits, temperatures, strategy: str) -> jax.Array:
    """Raw logits `[K, ..., C]` divided by per-teacher temperatures `[K]` (1 when None)."""
    if logits is None:
        raise ValueError(f"weighting {strategy!r} needs `logits`, the raw teacher logits "
                         "[K, ..., C].")
    logits = jnp.asarray(logits)
    k = _checks.check_teachers(logits, "logits")
    logits = jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32))
    if temperatures is None:
        return logits
    if jnp.shape(temperatures) != (k,):
        raise ValueError(f"`temperatures` must have shape [K]=({k},), one per teacher; got "
                         f"{jnp.shape(temperatures)}.")
    _checks.check_temperature(temperatures, "temperatures")
    t = jnp.asarray(temperatures, logits.dtype).reshape((k,) + (1,) * (logits.ndim - 1))
    # Unknown classes keep their logit (UNKNOWN_LOGIT / tau could come close to real ones).
    return jnp.where(logits > UNKNOWN_LOGIT / 2, logits / t, logits)


def _check_sharpness(sharpness) -> None:
    if not _checks.is_traced(sharpness) and not bool(np.all(np.asarray(sharpness) >= 0)):
        raise ValueError(f"`sharpness` must be >= 0, got {sharpness}.")


def _route(scores: jax.Array, sharpness) -> jax.Array:
    """softmax over the teacher axis of `sharpness * scores` `[K, ...]`."""
    return jax.nn.softmax(sharpness * scores, axis=0)


def energy(probs: jax.Array, *, logits: jax.Array | None = None, labels=None, label_mask=None,
           sharpness: float = 1.0, temperatures=None) -> jax.Array:
    r"""Route by negative free energy: :math:`w_k = \mathrm{softmax}_k(s\, E_k)`.

    :math:`E_k = \log \sum_{c \in S_k} e^{z_{kc}/\tau_k}` (minus the free energy of Liu et
    al. 2020, an in-distribution score: high where the teacher's training data was dense).
    With s = 1, one temperature and teachers of disjoint class sets, the fused target is
    exactly the softmax of all the teachers' logits side by side, as if they were one
    classifier (JEM's reading of logits as unnormalised :math:`\log p(x, y)`, Grathwohl et
    al. 2020). Labels are not used: the same with and without labels.

    Bounds: none; s = 0 gives uniform, large s one-hot on the highest-energy teacher.

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      logits: `[K, ..., C]` raw teacher logits (required; masked for unknown classes).
      sharpness: s >= 0.
      temperatures: optional `[K]` per-teacher temperatures :math:`\tau_k > 0`.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.array([[[0.0, 0.0]], [[jnp.log(3.0), jnp.log(3.0)]]])
      >>> [round(x, 3) for x in weighting.energy(jax.nn.softmax(z), logits=z)[:, 0].tolist()]
      [0.25, 0.75]
    """
    _check_sharpness(sharpness)
    z = _scaled_logits(logits, temperatures, "energy")
    return _route(jax.nn.logsumexp(z, axis=-1), sharpness).astype(jnp.result_type(probs))


def max_logit(probs: jax.Array, *, logits: jax.Array | None = None, labels=None,
              label_mask=None, sharpness: float = 1.0, temperatures=None) -> jax.Array:
    r"""Route by the largest logit: :math:`w_k = \mathrm{softmax}_k(s \max_{c \in S_k}
    z_{kc}/\tau_k)` (MaxLogit, Hendrycks et al. 2022).

    Close to ``energy`` (the logsumexp is the max plus at most log C_k), but not raised by a
    teacher that spreads its mass over many classes. Labels are not used.

    Bounds: none; s = 0 gives uniform, large s one-hot.

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      logits: `[K, ..., C]` raw teacher logits (required).
      sharpness: s >= 0.
      temperatures: optional `[K]` per-teacher temperatures.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.array([[[2.0, 0.0]], [[0.0, 2.0 + jnp.log(3.0)]]])
      >>> w = weighting.max_logit(jax.nn.softmax(z), logits=z)
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.25, 0.75]
    """
    _check_sharpness(sharpness)
    z = _scaled_logits(logits, temperatures, "max_logit")
    return _route(jnp.max(z, axis=-1), sharpness).astype(jnp.result_type(probs))


def calibrated(probs: jax.Array, *, logits: jax.Array | None = None, labels=None,
               label_mask=None, sharpness: float = 4.0, temperatures=None) -> jax.Array:
    r"""Route by calibrated confidence: :math:`w_k \propto c_k^{\,s}`,
    :math:`c_k = \max_{c \in S_k} \mathrm{softmax}(z_k/\tau_k)_c`.

    :math:`c_k` is teacher k's maximum softmax probability (Hendrycks & Gimpel 2017) after
    temperature scaling (Guo et al. 2017): with :math:`\tau_k` fitted on the teacher's own
    validation data (`fit_temperature`), :math:`c_k` estimates the probability that the
    teacher is right, so the teachers' confidences can be compared. Computed as
    :math:`\mathrm{softmax}_k(s \log c_k)`. Labels are not used.

    Bounds: none; s = 0 gives uniform, large s one-hot on the most confident teacher. A
    teacher that knows fewer classes has a higher floor (:math:`c_k \ge 1/|S_k|`).

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      logits: `[K, ..., C]` raw teacher logits (required).
      sharpness: s >= 0.
      temperatures: optional `[K]` fitted temperatures (`fit_temperature`), 1 when None.

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.log(jnp.array([[[0.9, 0.1]], [[0.5, 0.5]]]))
      >>> w = weighting.calibrated(jax.nn.softmax(z), logits=z, sharpness=1.0)
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.643, 0.357]
    """
    _check_sharpness(sharpness)
    z = _scaled_logits(logits, temperatures, "calibrated")
    log_conf = jnp.max(jax.nn.log_softmax(z, axis=-1), axis=-1)
    return _route(log_conf, sharpness).astype(jnp.result_type(probs))


def fit_temperature(logits, labels, *, known=None) -> float:
    r"""The temperature scaling of one teacher (Guo et al. 2017): the T > 0 that minimises
    the NLL of `softmax(logits / T)` on held-out labeled data.

    The NLL is convex in :math:`\beta = 1/T` (a logsumexp of :math:`\beta z` minus a linear
    term), so a golden-section search over :math:`\beta \in [10^{-3}, 10^2]` in float64
    finds the minimum. For a teacher that knows only some classes, give its validation
    examples of those classes and its global-space logits with `known` (its `[C]` row):
    unknown classes are masked.

    Args:
      logits: `[N, C]` the teacher's logits on its own validation examples.
      labels: `[N]` int labels in `[0, C)`.
      known: optional `[C]` bool, the classes the teacher knows.

    Returns:
      T, a Python float.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.weighting import fit_temperature
      >>> z = np.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])   # 3 of 4 right
      >>> round(fit_temperature(z, np.array([0, 0, 1, 1])), 2)
      3.64
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"`logits` must have shape [N, C] with N >= 1, got {z.shape}.")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != z.shape[:1]:
        raise ValueError(f"`labels` must be [N]=({z.shape[0]},) ints, got {y.dtype} "
                         f"{y.shape}.")
    if np.any((y < 0) | (y >= z.shape[1])):
        raise ValueError(f"`labels` must be in [0, {z.shape[1]}).")
    if known is not None:
        row = np.asarray(check_known(np.asarray(known)[None], 1, z.shape[1]))[0]
        if not np.all(row[y]):
            raise ValueError("`labels` hold classes the teacher does not know (`known`).")
        z = np.where(row, z, -np.inf)
    zy = np.take_along_axis(z, y[:, None], 1)[:, 0]

    def nll(beta):
        u = beta * z
        m = np.max(u, axis=1)
        return np.mean(m + np.log(np.sum(np.exp(u - m[:, None]), axis=1)) - beta * zy)

    lo, hi = np.log(1e-3), np.log(1e2)  # search over log beta: the same relative precision
    g = (np.sqrt(5.0) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(np.exp(a)), nll(np.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(np.exp(b))
    return float(1.0 / np.exp(0.5 * (lo + hi)))
