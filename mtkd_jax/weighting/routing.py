r"""Label-free routing: per-example weights from what each teacher can tell from the input.

When teachers come from different sources (different shards of the data, or different
classes, `mtkd_jax.class_sets`), the right teacher for an input is the one whose training
data looked like it. These strategies estimate that from each teacher's own logits, with no
label, so they weight labeled and unlabeled (transfer-set) examples alike:

* ``energy``: the teacher's free energy, :math:`\log \sum_c e^{z_{kc}}` (an in-distribution
  score, Liu et al. 2020);
* ``max_logit``: its largest logit (Hendrycks et al. 2022);
* ``calibrated``: its calibrated confidence, the largest temperature-scaled probability
  (Hendrycks & Gimpel 2017; Guo et al. 2017), temperatures fitted on each teacher's own
  validation data with `fit_temperature`;
* ``gate``: a small gate over the teachers' energies, per-teacher scale and bias fitted on
  labeled examples as a mixture of experts (`fit_gate`; Jacobs et al. 1991).

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
  Jacobs, Jordan, Nowlan & Hinton, "Adaptive Mixtures of Local Experts", Neural Comp. 1991.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtkd_jax import _checks
from mtkd_jax.class_sets import UNKNOWN_LOGIT, check_known, mask_unknown

__all__ = [
    "energy", "max_logit", "calibrated", "gate", "gate_features", "fit_temperature", "fit_gate",
]


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


def gate_features(logits: jax.Array, temperatures=None) -> jax.Array:
    r"""The ``gate``'s per-teacher features `[K, ..., F]`, F = 2 + 2C, at :math:`\tau_k`.

    :math:`\phi_k = [\max_c z_{kc},\ \max_c \log p_{kc},\ p_k,\ \bar p_{-k}]`: teacher
    k's max logit and max log-probability, its probabilities `[C]` and the mean
    probabilities of the other teachers `[C]` (what they think the input is). Symmetric in
    the other teachers, so a gate over them permutes with the teachers.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.weighting.routing import gate_features
      >>> gate_features(jnp.zeros((3, 5, 4))).shape
      (3, 5, 10)
    """
    z = _scaled_logits(logits, temperatures, "gate")
    k = z.shape[0]
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    others = (jnp.sum(p, axis=0, keepdims=True) - p) / max(k - 1, 1)
    return jnp.concatenate([jnp.max(z, -1, keepdims=True), jnp.max(logp, -1, keepdims=True),
                            p, others], axis=-1)


def gate(probs: jax.Array, *, scale, bias, logits: jax.Array | None = None, labels=None,
         label_mask=None, temperatures=None, coefficients=None) -> jax.Array:
    r"""A small gate over the teachers' outputs: :math:`w_k = \mathrm{softmax}_k(a_k E_k +
    b_k + \theta_k \cdot \phi_k)`, :math:`E_k = \log \sum_{c \in S_k} e^{z_{kc}/\tau_k}`.

    :math:`\phi_k` are `gate_features` (teacher k's max logit, max log-probability and
    probabilities, and the other teachers' mean probabilities), :math:`\theta_k` the
    optional `coefficients`. Scale, bias (and coefficients) are fitted by `fit_gate` as a
    mixture of experts on labeled examples (e.g. the labeled train and validation splits),
    then used label-free on every input, the transfer set included. ``energy`` is the gate
    with :math:`a_k = s, b_k = 0, \theta = 0`. Labels are not used here.

    Bounds: none.

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      scale: `[K]` per-teacher scales :math:`a_k`.
      bias: `[K]` per-teacher biases :math:`b_k`.
      logits: `[K, ..., C]` raw teacher logits (required).
      temperatures: optional `[K]` per-teacher temperatures.
      coefficients: optional `[K, 2 + 2C]` :math:`\theta` (None: 0).

    Returns:
      `[K, ...]` per-example weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax import weighting
      >>> z = jnp.zeros((2, 1, 3))
      >>> w = weighting.gate(jax.nn.softmax(z), logits=z, scale=jnp.ones(2),
      ...                    bias=jnp.array([0.0, jnp.log(3.0)]))
      >>> [round(x, 3) for x in w[:, 0].tolist()]
      [0.25, 0.75]
    """
    z = _scaled_logits(logits, temperatures, "gate")
    k = z.shape[0]
    for name, v in (("scale", scale), ("bias", bias)):
        if jnp.shape(v) != (k,):
            raise ValueError(f"`{name}` must have shape [K]=({k},), one per teacher; got "
                             f"{jnp.shape(v)}.")
    shape = (k,) + (1,) * (z.ndim - 2)
    g = (jnp.asarray(scale, z.dtype).reshape(shape) * jax.nn.logsumexp(z, axis=-1)
         + jnp.asarray(bias, z.dtype).reshape(shape))
    if coefficients is not None:
        f = gate_features(z)  # z is already scaled
        if jnp.shape(coefficients) != (k, f.shape[-1]):
            raise ValueError(f"`coefficients` must have shape [K, 2 + 2C]={(k, f.shape[-1])}, "
                             f"got {jnp.shape(coefficients)}.")
        theta = jnp.asarray(coefficients, z.dtype).reshape(shape + (f.shape[-1],))
        g = g + jnp.sum(theta * f, axis=-1)
    return jax.nn.softmax(g, axis=0).astype(jnp.result_type(probs))


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


def fit_gate(logits, labels, *, temperatures=None, known=None, features: bool = False,
             steps: int = 500, learning_rate: float = 0.05, l2: float = 1e-3) -> dict:
    r"""Fit the ``gate`` on labeled examples as a mixture of experts (Jacobs et al. 1991).

    Maximises :math:`\frac1N \sum_n \log \sum_k w_k(x_n)\, p_k(y_n \mid x_n)` with
    :math:`p_k` the teacher's softmax at :math:`\tau_k` (renormalised over its classes),
    minus `l2` times the squared coefficients, by full-batch Adam from the ``energy`` routing
    (:math:`a = 1, b = 0, \theta = 0`) on standardised features (folded back into the
    returned values). Deterministic: no key.

    Args:
      logits: `[K, N, C]` the teachers' logits on labeled examples.
      labels: `[N]` int labels.
      temperatures: optional `[K]` (as the gate will be called with).
      known: optional `[K, C]` known mask.
      features: also fit the `coefficients` over `gate_features`.
      steps: Adam steps.
      learning_rate: Adam's learning rate.
      l2: weight decay of the coefficients.

    Returns:
      ``{"scale": [K], "bias": [K]}`` (and ``"coefficients": [K, 2 + 2C]``) float32, for
      `get_weighting("gate", temperatures=..., **fitted)`.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.weighting import fit_gate
      >>> z = np.zeros((2, 4, 2), np.float32); z[0, :, 0] = 3.0     # teacher 0 always says 0
      >>> g = fit_gate(z, np.zeros(4, np.int32), steps=100)
      >>> bool(g["bias"][0] > g["bias"][1])
      True
    """
    z = jnp.asarray(logits)
    k = _checks.check_teachers(z, "logits")
    if z.ndim != 3:
        raise ValueError(f"`logits` must have shape [K, N, C], got {z.shape}.")
    _checks.check_labels(labels, "labels", z.shape[1:2])
    _checks.check_int(steps, "steps")
    if known is not None:
        z = mask_unknown(z, known)
    z = _scaled_logits(z, temperatures, "gate")
    y = jnp.asarray(labels)
    log_py = jnp.take_along_axis(jax.nn.log_softmax(z, -1), y[None, :, None], -1)[..., 0]
    lse = jax.nn.logsumexp(z, axis=-1)  # [K, N]
    offset = jnp.mean(lse, axis=1)
    lse = lse - offset[:, None]  # centred: the bias absorbs the offset
    f = gate_features(z)  # [K, N, F]
    mu, sd = jnp.mean(f, axis=1), jnp.std(f, axis=1) + 1e-6  # [K, F]
    fs = (f - mu[:, None]) / sd[:, None]
    tx = optax.adam(learning_rate)

    def loss(p):
        g = p["scale"][:, None] * lse + p["bias"][:, None]
        if features:
            g = g + jnp.einsum("knf,kf->kn", fs, p["coefficients"])
        nll = -jnp.mean(jax.nn.logsumexp(jax.nn.log_softmax(g, 0) + log_py, axis=0))
        return nll + l2 * jnp.sum(jnp.square(p.get("coefficients", 0.0)))

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            grads = jax.grad(loss)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
        return p

    init = {"scale": jnp.ones(k), "bias": jnp.zeros(k)}
    if features:
        init["coefficients"] = jnp.zeros(f.shape[::2])
    p = run(init)
    # Undo the centring: a (E - mean E) + b = a E + (b - a mean E); likewise for theta.
    out = {"scale": p["scale"], "bias": p["bias"] - p["scale"] * offset}
    if features:
        theta = p["coefficients"] / sd
        out["coefficients"] = theta
        out["bias"] = out["bias"] - jnp.sum(theta * mu, axis=1)
    return out
