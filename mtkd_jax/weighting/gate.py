r"""The ``gate``: a small network over the teachers' outputs that routes each input, fitted
on labeled examples as a mixture of experts (Jacobs et al. 1991), then used label-free.

The gate's logit for teacher k is

.. math::
    g_k = a_k E_k + b_k + \theta_k \cdot \phi_k + [W_2 \tanh(W_1 u + c_1) + c_2]_k,

with :math:`E_k = \log \sum_{c \in S_k} e^{z_{kc}/\tau_k}` (the ``energy`` score),
:math:`\phi_k` = `gate_features` (teacher k's own summary: linear, one coefficient vector per
teacher) and :math:`u` = `gate_inputs` (every teacher's log-probabilities side by side: the
hidden layer compares them). The weights are :math:`w = \mathrm{softmax}_k(g)`. ``energy``
is the gate with :math:`a_k = 1, b_k = 0` and nothing else; the linear part alone cannot
tell which teacher knows an input when every teacher is about as sure on inputs it never
saw (independently trained teachers usually are), the hidden layer can, from the pattern of
all their outputs together. Each part is optional; `fit_gate` fits the ones asked for.

References:
  Jacobs, Jordan, Nowlan & Hinton, "Adaptive Mixtures of Local Experts", Neural Comp. 1991.
  Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.class_sets import mask_unknown
from mtkd_jax.weighting.routing import _scaled_logits

__all__ = ["gate", "gate_features", "gate_inputs", "fit_gate", "LOG_PROB_FLOOR"]

# Log-probabilities are floored before they enter the hidden layer: a class a teacher does not
# know (probability 0) or rules out completely would otherwise be a huge, noisy input.
LOG_PROB_FLOOR = -30.0
_MLP_KEYS = ("w1", "b1", "w2", "b2")


def gate_features(logits: jax.Array, temperatures=None) -> jax.Array:
    r"""The ``gate``'s per-teacher features `[K, ..., F]`, F = 2 + 2C, at :math:`\tau_k`.

    :math:`\phi_k = [\max_c z_{kc},\ \max_c \log p_{kc},\ p_k,\ \bar p_{-k}]`: teacher
    k's max logit and max log-probability, its probabilities `[C]` and the mean
    probabilities of the other teachers `[C]` (what they think the input is). Symmetric in
    the other teachers, so a gate over them permutes with the teachers.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.weighting.gate import gate_features
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


def gate_inputs(logits: jax.Array, temperatures=None) -> jax.Array:
    r"""The hidden layer's input `[..., K (C + 2)]`: every teacher's outputs side by side.

    For each teacher k in order: :math:`E_k` (logsumexp of its logits), its max logit, and
    its log-probabilities floored at `LOG_PROB_FLOOR` (`[C]`; classes it does not know sit
    at the floor).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.weighting.gate import gate_inputs
      >>> gate_inputs(jnp.zeros((3, 5, 4))).shape
      (5, 18)
    """
    z = _scaled_logits(logits, temperatures, "gate")
    f = jnp.concatenate([jax.nn.logsumexp(z, -1, keepdims=True), jnp.max(z, -1, keepdims=True),
                         jnp.maximum(jax.nn.log_softmax(z, -1), LOG_PROB_FLOOR)], axis=-1)
    return jnp.moveaxis(f, 0, -2).reshape(*f.shape[1:-1], -1)


def _hidden(u: jax.Array, mlp) -> jax.Array:
    """`[..., K]` the hidden layer's contribution to the gate logits."""
    return jnp.tanh(u @ mlp["w1"] + mlp["b1"]) @ mlp["w2"] + mlp["b2"]


def _check_mlp(mlp, k: int, width: int) -> None:
    if not isinstance(mlp, dict) or set(mlp) != set(_MLP_KEYS):
        got = list(mlp) if isinstance(mlp, dict) else type(mlp).__name__
        raise ValueError(f"`mlp` must be a dict with keys {list(_MLP_KEYS)} (from `fit_gate` "
                         f"with hidden > 0), got {got}.")
    h = jnp.shape(mlp["b1"])
    want = {"w1": (width, *h), "b1": h, "w2": (*h, k), "b2": (k,)}
    for name, shape in want.items():
        if len(h) != 1 or jnp.shape(mlp[name]) != shape:
            raise ValueError(f"`mlp[{name!r}]` must have shape {shape} (K={k} teachers, input "
                             f"K(C + 2)={width}, H hidden units); got {jnp.shape(mlp[name])}.")


def gate(probs: jax.Array, *, scale, bias, logits: jax.Array | None = None, labels=None,
         label_mask=None, temperatures=None, coefficients=None, mlp=None) -> jax.Array:
    r"""The fitted gate (see the module docstring): :math:`w_k = \mathrm{softmax}_k(g_k)`.

    Scale, bias (and coefficients, mlp) are fitted by `fit_gate` on labeled examples (e.g.
    the labeled train and validation splits), then used label-free on every input, the
    transfer set included. Labels are not used here.

    Bounds: none.

    Args:
      probs: `[K, ..., C]` teacher probabilities (only the shape is used).
      scale: `[K]` per-teacher scales :math:`a_k`.
      bias: `[K]` per-teacher biases :math:`b_k`.
      logits: `[K, ..., C]` raw teacher logits (required).
      temperatures: optional `[K]` per-teacher temperatures.
      coefficients: optional `[K, 2 + 2C]` :math:`\theta` over `gate_features` (None: 0).
      mlp: optional hidden layer ``{"w1": [K (C + 2), H], "b1": [H], "w2": [H, K],
        "b2": [K]}`` over `gate_inputs` (None: none).

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
    if mlp is not None:
        u = gate_inputs(z)
        _check_mlp(mlp, k, u.shape[-1])
        g = g + jnp.moveaxis(_hidden(u, mlp), -1, 0)
    return jax.nn.softmax(g, axis=0).astype(jnp.result_type(probs))


def _standardised(f: jax.Array, axis: int):
    """(f standardised over `axis`, mean, std); constant columns become 0."""
    mu = jnp.mean(f, axis=axis, keepdims=True)
    sd = jnp.std(f, axis=axis, keepdims=True) + 1e-6
    return (f - mu) / sd, jnp.squeeze(mu, axis), jnp.squeeze(sd, axis)


def fit_gate(logits, labels, *, temperatures=None, known=None, features: bool = False,
             hidden: int = 0, key: jax.Array | None = None, steps: int | None = None,
             learning_rate: float | None = None, l2: float = 1e-3) -> dict:
    r"""Fit the ``gate`` on labeled examples as a mixture of experts (Jacobs et al. 1991).

    Maximises :math:`\frac1N \sum_n \log \sum_k w_k(x_n)\, p_k(y_n \mid x_n)` with
    :math:`p_k` the teacher's softmax at :math:`\tau_k` (renormalised over its classes),
    minus `l2` times the squared coefficients and hidden-layer weights, by full-batch Adam
    from the ``energy`` routing (:math:`a = 1, b = 0`, the rest 0 at the output) on
    standardised features (the standardisation is folded back into the returned values).
    Fit it on examples the teachers did not train on where there are enough of them: a
    teacher is surer on its own training examples than on new inputs.

    Args:
      logits: `[K, N, C]` the teachers' logits on labeled examples.
      labels: `[N]` int labels.
      temperatures: optional `[K]` (as the gate will be called with).
      known: optional `[K, C]` known mask.
      features: also fit the linear `coefficients` over `gate_features`.
      hidden: H > 0 also fits a hidden layer of H tanh units over `gate_inputs` (``mlp``).
      key: PRNG key of the hidden layer's initial weights (required when hidden > 0).
      steps: Adam steps; default 500, or 2000 with a hidden layer.
      learning_rate: Adam's learning rate; default 0.05, or 3e-3 with a hidden layer (the
        values docs/results/multi_source.md was measured with).
      l2: weight decay of the coefficients and hidden-layer weights.

    Returns:
      ``{"scale": [K], "bias": [K]}`` (plus ``"coefficients": [K, 2 + 2C]`` with
      `features`, ``"mlp"`` with `hidden`) float32, for
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
    _checks.check_int(hidden, "hidden", minimum=0)
    # The hidden layer needs more, smaller steps than the few linear coefficients.
    steps = _checks.check_int((2000 if hidden else 500) if steps is None else steps, "steps")
    if learning_rate is None:
        learning_rate = 3e-3 if hidden else 0.05
    if hidden and key is None:
        raise ValueError("`key` (a PRNG key for the hidden layer's initial weights) is needed "
                         f"with hidden={hidden}.")
    if known is not None:
        z = mask_unknown(z, known)
    z = _scaled_logits(z, temperatures, "gate")
    y = jnp.asarray(labels)
    log_py = jnp.take_along_axis(jax.nn.log_softmax(z, -1), y[None, :, None], -1)[..., 0]
    lse = jax.nn.logsumexp(z, axis=-1)  # [K, N]
    offset = jnp.mean(lse, axis=1)
    lse = lse - offset[:, None]  # centred: the bias absorbs the offset
    fs, mu, sd = _standardised(gate_features(z), axis=1)  # [K, N, F], [K, F]
    us, u_mu, u_sd = _standardised(gate_inputs(z), axis=0)  # [N, K (C + 2)], [K (C + 2)]
    tx = optax.adam(learning_rate)

    def loss(p):
        g = p["scale"][:, None] * lse + p["bias"][:, None]
        penalty = 0.0
        if features:
            g = g + jnp.einsum("knf,kf->kn", fs, p["coefficients"])
            penalty = penalty + jnp.sum(jnp.square(p["coefficients"]))
        if hidden:
            g = g + _hidden(us, p["mlp"]).T
            penalty = penalty + jnp.sum(jnp.square(p["mlp"]["w1"])) + jnp.sum(
                jnp.square(p["mlp"]["w2"]))
        nll = -jnp.mean(jax.nn.logsumexp(jax.nn.log_softmax(g, 0) + log_py, axis=0))
        return nll + l2 * penalty

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
        init["coefficients"] = jnp.zeros(fs.shape[::2])
    if hidden:
        width = us.shape[-1]
        # Output weights start at 0, so the fit starts from the energy routing.
        init["mlp"] = {"w1": jax.random.normal(key, (width, hidden)) / jnp.sqrt(width),
                       "b1": jnp.zeros(hidden), "w2": jnp.zeros((hidden, k)),
                       "b2": jnp.zeros(k)}
    p = run(init)
    # Undo the centring: a (E - mean E) + b = a E + (b - a mean E); likewise for theta, W1.
    out = {"scale": p["scale"], "bias": p["bias"] - p["scale"] * offset}
    if features:
        theta = p["coefficients"] / sd
        out["coefficients"] = theta
        out["bias"] = out["bias"] - jnp.sum(theta * mu, axis=1)
    if hidden:
        w1 = p["mlp"]["w1"] / u_sd[:, None]
        out["mlp"] = {"w1": w1, "b1": p["mlp"]["b1"] - u_mu @ w1, "w2": p["mlp"]["w2"],
                      "b2": p["mlp"]["b2"]}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)
