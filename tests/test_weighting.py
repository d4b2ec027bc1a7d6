"""Tests for mtkd_jax.weighting: every strategy against a float64 NumPy reference, jitted and
with extra batch dims, gradients; properties over the whole registry (non-negative, sum to 1,
permutation-equivariant, bounds); the protocol, `register_weighting` and `get_weighting`."""

import functools
import inspect

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    SHAPE,
    TOL,
    assert_matches,
    np_log_softmax,
    np_softmax,
    random_logits,
    random_probs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mtkd_jax import weighting

K = SHAPE[0]
KINDS = ("squared", "euclidean", "kl", "js")


# ---------------------------------------------------------------- float64 NumPy references
def np_per_teacher(v, probs):
    """`[K]` -> `[K, ...]` broadcast over the batch dims of `[K, ..., C]`."""
    v = np.asarray(v, np.float64)
    return np.broadcast_to(v.reshape((-1,) + (1,) * (probs.ndim - 2)), probs.shape[:-1])


def np_static(lambdas, probs):
    lam = np.asarray(lambdas, np.float64)
    return np_per_teacher(lam / lam.sum(), probs)


def np_from_scores(scores, probs, temperature=1.0):
    return np_per_teacher(np_softmax(np.asarray(scores, np.float64) / temperature), probs)


def np_confidence(logits, labels, label_mask=None):
    if label_mask is not None:  # unlabeled: the ensemble's argmax stands in for the label
        ensemble = np.argmax(np_softmax(logits).mean(0), axis=-1)
        labels = np.where(np.asarray(label_mask) > 0, labels, ensemble)
    logp = np_log_softmax(logits)  # [K, ..., C]
    ce = -np.take_along_axis(logp, np.asarray(labels)[None, ..., None], axis=-1)[..., 0]
    k = logits.shape[0]
    return (1.0 - np_softmax(ce, axis=0)) / (k - 1)


def np_posterior(logits, labels, label_mask=None, sharpness=1.0):
    """float64 Bayes' rule: w_k proportional to p_k(y)^s; uniform where unlabeled."""
    logp = np_log_softmax(np.asarray(logits, np.float64))
    log_py = np.take_along_axis(logp, np.asarray(labels)[None, ..., None], -1)[..., 0]
    e = sharpness * log_py
    if label_mask is not None:
        e = np.where(np.asarray(label_mask)[None] > 0, e, 0.0)
    return np_softmax(e, axis=0)


def np_entropy_of(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def np_entropy(probs):
    h = np_entropy_of(probs)
    k = probs.shape[0]
    total = h.sum(0, keepdims=True)
    return np.where(total > 0, (1.0 - h / np.where(total > 0, total, 1.0)) / (k - 1), 1.0 / k)


def np_divergence(pi, pj, kind):
    pi, pj = np.asarray(pi, np.float64), np.asarray(pj, np.float64)
    sq = np.sum((pi - pj) ** 2, axis=-1)
    kl = lambda a, b: np.sum(a * np.log(a / b), axis=-1)  # strictly positive inputs only
    return {
        "squared": lambda: sq,
        "euclidean": lambda: np.sqrt(sq),
        "kl": lambda: kl(pi, pj),
        "js": lambda: 0.5 * kl(pi, (pi + pj) / 2) + 0.5 * kl(pj, (pi + pj) / 2),
    }[kind]()


def np_agreement(probs, kind="squared", sharpness=1.0):
    k = probs.shape[0]
    mean_d = np.stack(
        [sum(np_divergence(probs[i], probs[j], kind) for j in range(k) if j != i) / (k - 1)
         for i in range(k)]
    )  # [K, ...]
    return np_softmax(-sharpness * mean_d, axis=0)


def np_logsumexp(z, axis=-1):
    z = np.asarray(z, np.float64)
    m = z.max(axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis, keepdims=True))).squeeze(axis)


def np_routing(logits, kind, sharpness=1.0, temperatures=None, scale=None, bias=None):
    """The routing strategies (weighting/routing.py): softmax over K of a per-teacher score."""
    z = np.asarray(logits, np.float64)
    if temperatures is not None:
        z = z / np.asarray(temperatures, np.float64).reshape((-1,) + (1,) * (z.ndim - 1))
    if kind == "energy":
        score = sharpness * np_logsumexp(z)
    elif kind == "max_logit":
        score = sharpness * z.max(-1)
    elif kind == "calibrated":
        score = sharpness * np_log_softmax(z).max(-1)
    else:  # gate
        shape = (-1,) + (1,) * (z.ndim - 2)
        score = np.reshape(scale, shape) * np_logsumexp(z) + np.reshape(bias, shape)
    return np_softmax(score, axis=0)


def random_labels(rng, shape=SHAPE):
    return rng.integers(0, shape[-1], size=shape[1:-1]).astype(np.int32)

# ---------------------------------------------------------------- values: jit, batched
def test_uniform_matches_reference(rng):
    p = random_probs(rng)
    assert_matches(weighting.uniform, (p,), np.full(SHAPE[:-1], 1.0 / K))


def test_static_matches_reference(rng):
    p = random_probs(rng)
    lam = rng.uniform(0.1, 3.0, size=K).astype(np.float32)
    assert_matches(lambda p, lam: weighting.static(p, lambdas=lam), (p, lam), np_static(lam, p))
    # A zero lambda is allowed (that teacher is switched off), integers are accepted; closed
    # over (concrete) lambdas are checked on the host inside jit without a tracer error.
    assert_matches(weighting.static, (p,), np_static([0, 1, 3], p), lambdas=np.array([0, 1, 3]))
    assert_matches(weighting.static, (p,), np_static([1, 2, 3], p),
                   lambdas=jnp.array([1.0, 2.0, 3.0]))


def test_from_scores_matches_reference(rng):
    p = random_probs(rng)
    scores = rng.uniform(0.6, 0.95, size=K).astype(np.float32)
    fn = jax.jit(lambda p, s, t: weighting.from_scores(p, scores=s, temperature=t))
    for t in (0.05, 1.0, 10.0):  # traced temperature
        np.testing.assert_allclose(fn(p, scores, t), np_from_scores(scores, p, t), **TOL)


def test_from_scores_temperature_limits():
    p = np.full((3, 1, 2), 0.5, np.float32)
    scores = np.array([0.7, 0.9, 0.8], np.float32)
    np.testing.assert_allclose(
        weighting.from_scores(p, scores=scores, temperature=1e-3)[:, 0], [0.0, 1.0, 0.0],
        atol=1e-6)
    np.testing.assert_allclose(
        weighting.from_scores(p, scores=scores, temperature=1e4)[:, 0], 1.0 / 3, atol=1e-4)


def test_confidence_matches_reference(rng):
    z, y = random_logits(rng), random_labels(rng)
    assert_matches(lambda z, y: weighting.confidence(jax.nn.softmax(z / 4.0), logits=z, labels=y),
           (z, y), np_confidence(z, y))


def test_confidence_unlabeled_examples_use_the_ensemble_argmax(rng):
    z, y = random_logits(rng), random_labels(rng)
    mask = rng.integers(0, 2, size=y.shape).astype(np.float32)
    p = jax.nn.softmax(z)
    assert_matches(lambda z, y, m: weighting.confidence(p, logits=z, labels=y, label_mask=m),
           (z, y, mask), np_confidence(z, y, mask))
    # No labels at all: every example is unlabeled.
    assert_matches(lambda z: weighting.confidence(p, logits=z), (z,), np_confidence(z, y, 0 * mask))


def test_confidence_prefers_the_teacher_that_is_right():
    # Teacher 0 is confidently right, teacher 1 unsure, teacher 2 confidently wrong.
    z = np.array([[[6.0, 0.0]], [[0.0, 0.0]], [[0.0, 6.0]]], np.float32)
    w = np.asarray(weighting.confidence(jax.nn.softmax(z), logits=z, labels=np.array([0])))[:, 0]
    assert w[0] > w[1] > w[2]
    np.testing.assert_allclose(w, np_confidence(z, np.array([0]))[:, 0], **TOL)


def test_posterior_matches_reference(rng):
    z = random_logits(rng, (3, 4, 6, 5))  # [K, B, L, V]: per token
    y = rng.integers(0, 5, size=(4, 6))
    mask = (rng.uniform(size=(4, 6)) > 0.3).astype(np.float32)
    p = np_softmax(z)
    for s in (0.0, 1.0, 3.0):
        assert_matches(lambda z, s=s: weighting.posterior(p, logits=z, labels=y, label_mask=mask,
                                                  sharpness=s),
               (z,), np_posterior(z, y, mask, s))
    np.testing.assert_allclose(weighting.posterior(p, logits=z), np.full((3, 4, 6), 1 / 3),
                               **TOL)


def test_posterior_routes_past_one_over_k_minus_one():
    """A teacher that alone gives the label most of its mass gets nearly all the weight
    (`confidence` would stop at 1/(K-1) = 0.5)."""
    z = np.zeros((3, 1, 4), np.float32)
    z[0, 0, 2], z[1, 0, 0], z[2, 0, 1] = 8.0, 8.0, 8.0  # only teacher 0 expects the label
    w = np.asarray(weighting.posterior(np_softmax(z), logits=z, labels=np.array([2])))
    assert w[0, 0] > 0.99
    # Against unsure teachers the evidence is weaker: 0.999 vs 0.25 and 0.25 -> about 2/3.
    z[1:] = 0.0
    w = np.asarray(weighting.posterior(np_softmax(z), logits=z, labels=np.array([2])))
    np.testing.assert_allclose(w[0, 0], 0.9990 / (0.9990 + 0.5), rtol=1e-3)
    with pytest.raises(ValueError, match=r"`sharpness` must be >= 0"):
        weighting.posterior(np_softmax(z), logits=z, labels=np.array([2]), sharpness=-1.0)
    with pytest.raises(ValueError, match=r"needs `logits`"):
        weighting.posterior(np_softmax(z), labels=np.array([2]))


@pytest.mark.parametrize("k", [3, 4])
def test_confidence_of_teachers_that_give_the_label_probability_zero(k, rng):
    """CA-MKD's weights sum to 1 and none exceeds 1/(K-1): the m teachers that give the label
    probability 0 (a class they do not know) get weight 0 only when m = 1; else they share
    the rest, (1 - 1/m)/(K-1) each (their cross-entropies, ~1e9, are equal in float32)."""
    from mtkd_jax.core import class_sets

    for m in range(1, k):
        groups = [[0, 1]] * (k - m) + [[2, 3]] * m  # the first K-m know the label 0
        local = [rng.normal(size=(5, 2)).astype(np.float32) for _ in groups]
        z = class_sets.to_global_logits(local, groups, num_classes=4)
        w = np.asarray(weighting.confidence(jax.nn.softmax(z), logits=z,
                                            labels=np.zeros(5, np.int32)))
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
        np.testing.assert_allclose(w[k - m:], (1 - 1 / m) / (k - 1), atol=1e-6)
        assert np.all(w[: k - m] > (1 - 1 / m) / (k - 1))


def test_entropy_matches_reference(rng):
    p = random_probs(rng)
    assert_matches(weighting.entropy, (p,), np_entropy(p))


def test_entropy_is_taken_at_temperature_one_from_the_logits(rng):
    # EBKD (as CA-MKD codes it) takes the entropy of the T = 1 predictions, whatever T the
    # distillation uses; `probs` at T = 4 must not change the weights when logits are given.
    z = random_logits(rng)
    p_t4 = np.asarray(jax.nn.softmax(z / 4.0))
    assert_matches(lambda p, z: weighting.entropy(p, logits=z), (p_t4, z),
                   np_entropy(np_softmax(z)))
    assert not np.allclose(np_entropy(p_t4), np_entropy(np_softmax(z)), atol=1e-3)


def test_entropy_weights_stay_non_negative_under_jit(rng):
    """A teacher that holds all the entropy gets weight 0, not -1e-9 (XLA's rounding)."""
    z = rng.normal(size=(3, 512, 10)).astype(np.float32)
    z[:2] *= 40.0  # two near-one-hot teachers, one soft one
    w = np.asarray(jax.jit(lambda z: weighting.entropy(jax.nn.softmax(z), logits=z))(z))
    assert w.min() >= 0.0
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5)


def test_entropy_one_hot_teachers():
    # Mixed: one one-hot teacher among soft ones; all one-hot: falls back to uniform.
    p = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
                  [[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]],
                  [[0.3, 0.3, 0.4], [0.0, 0.0, 1.0]]], np.float32)
    w = np.asarray(weighting.entropy(p))
    np.testing.assert_allclose(w, np_entropy(p), **TOL)
    np.testing.assert_allclose(w[:, 1], 1.0 / 3, rtol=1e-6)
    assert w[0, 0] == w.max()


def test_agreement_matches_reference(rng):
    p = random_probs(rng)
    fn = jax.jit(lambda p, s: {kind: weighting.agreement(p, kind=kind, sharpness=s)
                               for kind in KINDS})
    for kind, w in fn(p, 3.0).items():
        assert w.shape == SHAPE[:-1]
        np.testing.assert_allclose(w, np_agreement(p, kind, 3.0), **TOL, err_msg=kind)


def test_agreement_dissenter_counts_less_and_sharpness_zero_is_uniform():
    p = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.1, 0.9]]], np.float32)
    fn = jax.jit(lambda p, s: weighting.agreement(p, sharpness=s))
    w = np.asarray(fn(p, 2.0))[:, 0]
    assert w[2] < w[0] < w[1]  # teacher 1 is nearest to the other two
    np.testing.assert_allclose(w, np_agreement(p, "squared", 2.0)[:, 0], **TOL)
    np.testing.assert_allclose(fn(p, 0.0), 1.0 / 3, rtol=1e-6)


def test_single_teacher(rng):
    p = random_probs(rng, (1, 2, 3))
    z = random_logits(rng, (1, 2, 3))
    ws = jax.jit(lambda p, z: (
        weighting.uniform(p), weighting.entropy(p),
        weighting.confidence(p, logits=z, labels=jnp.array([0, 2])),
        weighting.static(p, lambdas=jnp.array([2.0])),
        weighting.from_scores(p, scores=jnp.array([0.3]))))(p, z)
    for w in ws:
        np.testing.assert_allclose(w, np.ones((1, 2)))


def test_eager_float64_numpy_inputs(rng):
    # Eager calls with NumPy's default dtype: float64 inputs must not trigger JAX's
    # float64-truncation warning (an error under this suite's filterwarnings).
    p = rng.dirichlet(np.ones(4), size=(3, 2))
    z, y = rng.standard_normal((3, 2, 4)), rng.integers(0, 4, size=2)
    lam, scores = np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3])
    cases = [
        (weighting.uniform(p), np.full((3, 2), 1 / 3)),
        (weighting.static(p, lambdas=lam), np_static(lam, p)),
        (weighting.from_scores(p, scores=scores), np_from_scores(scores, p)),
        (weighting.entropy(p), np_entropy(p)),
        (weighting.confidence(p, logits=z, labels=y), np_confidence(z, y)),
        (weighting.agreement(p), np_agreement(p)),
    ]
    for w, ref in cases:
        assert w.dtype == jnp.float32
        np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- gradients
def test_grads(rng):
    with jax.enable_x64(True):
        p = rng.dirichlet(np.full(4, 2.0), size=(3, 2))
        z, y = 2.0 * rng.standard_normal((3, 2, 4)), rng.integers(0, 4, size=2)
        lam, scores = rng.uniform(0.5, 2.0, size=3), rng.uniform(0.5, 1.0, size=3)
        r = rng.standard_normal((5, 3, 2))

        def f(p, z, lam, scores, t, s):
            # Every differentiable input of every strategy, in one scalar with independent
            # random cotangents (the gradients of each divergence kind are checked in
            # test_divergence.py).
            ws = (weighting.static(p, lambdas=lam),
                  weighting.from_scores(p, scores=scores, temperature=t),
                  weighting.confidence(p, logits=z, labels=y), weighting.entropy(p),
                  weighting.agreement(p, kind="squared", sharpness=s))
            return sum(jnp.sum(ri * w) for ri, w in zip(r, ws, strict=True))

        check_grads(jax.jit(f), (p, z, lam, scores, 0.5, 2.0), order=1, modes=["rev"], eps=1e-6)
    g = jax.grad(lambda p: jnp.sum(r[0] * weighting.uniform(p)))(p.astype(np.float32))
    np.testing.assert_array_equal(g, 0.0)


def test_finite_grads_at_extreme_logits_and_zero_probs(rng):
    z = rng.choice([-50.0, 50.0], size=(3, 2, 4)).astype(np.float32)
    z[1] = z[0]  # two teachers that agree exactly
    y = np.array([0, 3], np.int32)
    r = rng.standard_normal((3, 2)).astype(np.float32)
    zero_probs = np.array([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.5, 0.5, 0.0]], [[0.0, 0.0, 0.0, 1.0]]],
                          np.float32)

    def f(z, p):
        # One scalar, one compile: a sum of gradients is finite only if every term is. The
        # probabilities are the softmax of the extreme logits (underflowing to 0) next to
        # hand-written exact zeros, along the batch axis.
        p = jnp.concatenate([jax.nn.softmax(z), p], axis=1)  # [3, 3, 4]
        ws = [weighting.entropy(p)] + [weighting.agreement(p, kind=kind) for kind in KINDS]
        rr = jnp.concatenate([r, r[:, :1]], axis=1)
        conf = weighting.confidence(jax.nn.softmax(z), logits=z, labels=y)
        return sum(jnp.sum(rr * w) for w in ws) + jnp.sum(r * conf) + jnp.sum(
            r * weighting.entropy(jax.nn.softmax(z), logits=z))

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z, zero_probs)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- properties over the registry
def _hyperparameters(name, k, rng):
    """Values for a strategy's required hyperparameters: positive `[K]` arrays."""
    required = [
        p.name for p in inspect.signature(weighting.WEIGHTINGS[name]).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
        and p.name not in weighting.PROTOCOL_KEYWORDS
    ]
    return {h: rng.uniform(0.1, 2.0, size=k).astype(np.float32) for h in required}


@st.composite
def strategy_inputs(draw):
    """Logits `[4, 3, 5]` (large magnitudes included), labels, a label mask, a temperature."""
    z = draw(hnp.arrays(np.float32, (4, 3, 5), elements=st.floats(-60, 60, width=32)))
    y = draw(hnp.arrays(np.int32, (3,), elements=st.integers(0, 4)))
    mask = draw(hnp.arrays(np.float32, (3,), elements=st.sampled_from([0.0, 1.0])))
    t = draw(st.sampled_from([1.0, 4.0]))
    return z, y, mask, t


@functools.partial(jax.jit, static_argnames=("name", "t"))
def _weights_jit(z, y, mask, hyper, *, name, t):
    fn = weighting.get_weighting(name, **hyper)
    w = fn(jax.nn.softmax(z / t), logits=z, labels=y, label_mask=mask)
    return jnp.broadcast_to(w.reshape(w.shape + (1,) * (2 - w.ndim)), (4, 3))


def _weights(name, z, y, mask, t, hyper):
    return np.asarray(_weights_jit(z, y, mask, hyper, name=name, t=t))


@settings(max_examples=12)
@given(inputs=strategy_inputs(), perm=st.permutations(range(4)))
def test_registry_properties(inputs, perm):
    """Every registered strategy: finite, >= 0, sums to 1 over K, permutes with the teachers."""
    z, y, mask, t = inputs
    perm = np.asarray(perm)
    rng = np.random.default_rng(0)
    for name in sorted(weighting.WEIGHTINGS):
        hyper = _hyperparameters(name, 4, rng)
        w = _weights(name, z, y, mask, t, hyper)
        assert np.all(np.isfinite(w)) and np.all(w >= 0), name
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5, err_msg=name)
        w_perm = _weights(name, z[perm], y, mask, t, {h: v[perm] for h, v in hyper.items()})
        np.testing.assert_allclose(w_perm, w[perm], rtol=1e-5, atol=1e-6, err_msg=name)


@settings(max_examples=12)
@given(inputs=strategy_inputs(), perm=st.permutations(range(4)))
def test_gate_with_a_hidden_layer_has_the_registry_properties(inputs, perm):
    """The gate's optional parts (coefficients, hidden layer) keep the properties; the teacher
    blocks of the hidden layer's weights permute with the teachers."""
    z, y, mask, t = inputs
    perm = np.asarray(perm)
    rng = np.random.default_rng(1)
    k, c, h = 4, 5, 3
    hyper = {"scale": rng.uniform(0.1, 2.0, k), "bias": rng.normal(size=k),
             "coefficients": rng.normal(size=(k, 2 + 2 * c)),
             "mlp": {"w1": rng.normal(size=(k * (c + 2), h)), "b1": rng.normal(size=h),
                     "w2": rng.normal(size=(h, k)), "b2": rng.normal(size=k)}}
    hyper = jax.tree.map(lambda a: np.asarray(a, np.float32), hyper)
    w = _weights("gate", z, y, mask, t, hyper)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5)
    m = hyper["mlp"]
    permuted = {"scale": hyper["scale"][perm], "bias": hyper["bias"][perm],
                "coefficients": hyper["coefficients"][perm],
                "mlp": {"w1": m["w1"].reshape(k, c + 2, h)[perm].reshape(-1, h), "b1": m["b1"],
                        "w2": m["w2"][:, perm], "b2": m["b2"][perm]}}
    np.testing.assert_allclose(_weights("gate", z[perm], y, mask, t, permuted), w[perm],
                               rtol=1e-4, atol=1e-5)


@settings(max_examples=10)
@given(inputs=strategy_inputs())
def test_confidence_and_entropy_never_exceed_one_over_k_minus_one(inputs):
    z, y, mask, t = inputs
    for name in ("confidence", "entropy"):
        w = _weights(name, z, y, mask, t, {})
        assert np.all(w <= 1.0 / 3 + 1e-6), name


def test_every_registered_strategy_has_the_protocol_signature():
    for name, fn in weighting.WEIGHTINGS.items():
        params = inspect.signature(fn).parameters
        first = next(iter(params.values()))
        assert first.name == "probs", name
        for kw in weighting.PROTOCOL_KEYWORDS:
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY, (name, kw)
        assert fn.__name__ == name, "one name per strategy: registry key = function name"


# ---------------------------------------------------------------- bad input
P = np.full((3, 2, 4), 0.25, np.float32)


@pytest.mark.parametrize(
    "lambdas, match",
    [
        (np.array([1.0, -0.5, 1.0]), r"`lambdas` must be non-negative"),
        (np.zeros(3), r"`lambdas` must not be all zero"),
        (np.array([1.0, np.nan, 1.0]), r"`lambdas` must be finite"),
        (np.ones(2), r"`lambdas` must have shape \[K\]=\(3,\)"),
        (np.ones((3, 2)), r"`lambdas` must have shape \[K\]=\(3,\)"),
    ],
)
def test_static_bad_lambdas(lambdas, match):
    with pytest.raises(ValueError, match=match):
        weighting.static(P, lambdas=lambdas)
    with pytest.raises(ValueError, match=match):  # closed over inside jit: checked too
        jax.jit(weighting.get_weighting("static", lambdas=lambdas))(P)


def test_traced_lambdas_are_not_checked_but_work():
    w = jax.jit(lambda lam, p: weighting.static(p, lambdas=lam))(jnp.array([1.0, 1.0, 2.0]), P)
    np.testing.assert_allclose(w[:, 0], [0.25, 0.25, 0.5])


def test_from_scores_bad_input():
    with pytest.raises(ValueError, match=r"`scores` must have shape \[K\]=\(3,\)"):
        weighting.from_scores(P, scores=np.ones(4))
    with pytest.raises(ValueError, match=r"`scores` must be finite"):
        weighting.from_scores(P, scores=np.array([0.5, np.nan, 0.5]))
    for t in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
            weighting.from_scores(P, scores=np.ones(3), temperature=t)


def test_confidence_bad_input():
    z = np.zeros((3, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"'confidence' needs `logits`"):
        weighting.confidence(P)
    with pytest.raises(TypeError, match=r"`labels` must be integer class indices"):
        weighting.confidence(P, logits=z, labels=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\)"):
        weighting.confidence(P, logits=z, labels=np.zeros(3, np.int32))
    with pytest.raises(TypeError, match=r"`logits` must be a floating-point array"):
        weighting.confidence(P, logits=z.astype(np.int32), labels=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"`label_mask` must have the shape of `labels`"):
        weighting.confidence(P, logits=z, labels=np.zeros(2, np.int32), label_mask=np.ones(3))


def test_agreement_bad_input():
    with pytest.raises(ValueError, match=r"`probs` holds 1 teacher.*at least 2"):
        weighting.agreement(P[:1])
    with pytest.raises(ValueError, match=r"`sharpness` must be >= 0"):
        weighting.agreement(P, sharpness=-1.0)
    with pytest.raises(ValueError, match=r"`kind` must be one of \['euclidean', 'js', 'kl', "):
        weighting.agreement(P, kind="cosine")


@pytest.mark.parametrize("name", ["uniform", "entropy", "agreement", "static"])
def test_integer_or_flat_probs(name):
    fn = weighting.get_weighting(name, **({"lambdas": np.ones(3)} if name == "static" else {}))
    with pytest.raises(TypeError, match=r"`probs` must be a floating-point array"):
        fn(np.ones((3, 2, 4), np.int32))
    with pytest.raises(ValueError, match=r"`probs` must have at least 2 dims"):
        fn(np.full(4, 0.25, np.float32))


# ---------------------------------------------------------------- get_weighting, register
def test_get_weighting_each_name(rng):
    p = random_probs(rng, (3, 2, 4))
    z, y = random_logits(rng, (3, 2, 4)), random_labels(rng, (3, 2, 4))
    lam, scores = np.array([1.0, 2.0, 5.0], np.float32), np.array([0.5, 0.9, 0.7], np.float32)
    cases = {
        "uniform": (weighting.get_weighting("uniform"), np.full((3, 2), 1 / 3)),
        "confidence": (weighting.get_weighting("confidence"), np_confidence(z, y)),
        "posterior": (weighting.get_weighting("posterior", sharpness=2.0),
                      np_posterior(z, y, sharpness=2.0)),
        "entropy": (weighting.get_weighting("entropy"), np_entropy(np_softmax(z))),
        "agreement": (weighting.get_weighting("agreement"), np_agreement(p)),
        "static": (weighting.get_weighting("static", lambdas=lam), np_static(lam, p)),
        "from_scores": (weighting.get_weighting("from_scores", scores=scores),
                        np_from_scores(scores, p)),
        "from_scores T": (weighting.get_weighting("from_scores", scores=scores, temperature=0.1),
                          np_from_scores(scores, p, 0.1)),
        "agreement kl": (weighting.get_weighting("agreement", kind="kl", sharpness=4.0),
                         np_agreement(p, "kl", 4.0)),
        "energy": (weighting.get_weighting("energy"), np_routing(z, "energy")),
        "energy T": (weighting.get_weighting("energy", sharpness=2.0, temperatures=lam),
                     np_routing(z, "energy", 2.0, lam)),
        "max_logit": (weighting.get_weighting("max_logit", sharpness=0.5),
                      np_routing(z, "max_logit", 0.5)),
        "calibrated": (weighting.get_weighting("calibrated", temperatures=lam),
                       np_routing(z, "calibrated", 4.0, lam)),
        "gate": (weighting.get_weighting("gate", scale=scores, bias=lam),
                 np_routing(z, "gate", scale=scores, bias=lam)),
    }
    assert {n.split()[0] for n in cases} == set(weighting.WEIGHTINGS)
    for name, (fn, ref) in cases.items():
        np.testing.assert_allclose(fn(p, logits=z, labels=y), ref, **TOL, err_msg=name)
        # Resolved strategies are jit-safe.
        out = jax.jit(lambda p, z, y, fn=fn: fn(p, logits=z, labels=y))(p, z, y)
        np.testing.assert_allclose(out, ref, **TOL, err_msg=name)


def test_get_weighting_binds_hyperparameters_of_callables():
    def mine(probs, *, sharpness, logits=None, labels=None, label_mask=None):
        return weighting.agreement(probs, sharpness=sharpness)

    fn = weighting.get_weighting(mine, sharpness=0.0)
    np.testing.assert_allclose(fn(P), 1.0 / 3)
    with pytest.raises(ValueError, match=r"mine needs \['sharpness'\].*missing \['sharpness'\]"):
        weighting.get_weighting(mine)
    assert weighting.get_weighting(weighting.uniform) is weighting.uniform


def test_get_weighting_bad_names_and_hyperparameters():
    with pytest.raises(ValueError, match=r"Unknown weighting 'best'; registered names: "
                                         r"\['agreement', 'calibrated', 'confidence', "
                                         r"'energy', 'entropy', 'from_scores', 'gate', "
                                         r"'max_logit', 'posterior', 'static', 'uniform'\]"):
        weighting.get_weighting("best")
    with pytest.raises(ValueError, match=r"'static' needs \['lambdas'\].*missing \['lambdas'\]"):
        weighting.get_weighting("static")
    with pytest.raises(ValueError, match=r"'from_scores' needs \['scores'\].*missing "):
        weighting.get_weighting("from_scores", temperature=2.0)
    with pytest.raises(ValueError, match=r"'uniform'.*unknown \['sharpness'\]"):
        weighting.get_weighting("uniform", sharpness=1.0)
    with pytest.raises(ValueError, match=r"'static'.*unknown \['lambda'\]"):
        weighting.get_weighting("static", lambdas=np.ones(3), **{"lambda": 1})
    with pytest.raises(ValueError, match=r"unknown \['logits'\]"):
        weighting.get_weighting("uniform", logits=np.ones(3))
    with pytest.raises(TypeError, match=r"`name_or_fn` must be a weighting name or a function"):
        weighting.get_weighting(3)


def test_register_checks_the_protocol_and_names():
    def no_protocol(probs):
        return weighting.uniform(probs)

    with pytest.raises(TypeError, match=r"'bad' must have the signature fn\(probs, \*, logits"):
        weighting.register_weighting("bad", no_protocol)
    with pytest.raises(ValueError, match=r"'uniform' is already registered"):
        weighting.register_weighting("uniform", weighting.uniform)
    with pytest.raises(ValueError, match=r"`name` must be a non-empty str"):
        weighting.register_weighting("", weighting.uniform)
    assert "bad" not in weighting.WEIGHTINGS


def test_scale_conventions_of_the_anchors(rng):
    """The factors `mtkd_jax.weighting`'s docstring states, against float64 reimplementations
    of each anchor's reduction: CA-MKD divides its weighted sum of per-teacher T^2 KLs by
    B x K (loss `per_teacher_soft_kl`/K, gradient the library's /K); EBKD's weights are not
    divided by K-1, the same reduction ((K-1)/K of the library's); big_vision sums the
    per-teacher batch means (K times the library's uniform)."""
    from mtkd_jax.core.losses import per_teacher_soft_kl
    from mtkd_jax.objective.loss import mean_distillation_loss
    from mtkd_jax.objective.targets import distill_targets

    k, b, c, t = 3, 6, 5, 4.0
    zt = rng.normal(scale=2.0, size=(k, b, c))
    s0 = rng.normal(size=(b, c))
    y = rng.integers(0, c, size=b)
    p = np_softmax(zt / t)

    def np_kl(s):  # [K, B] T^2 KL(p_k || softmax(s / T)), float64
        return t * t * np.sum(p * (np.log(p) - np_log_softmax(s / t)), -1)

    h = np_entropy_of(np_softmax(zt))
    anchors = {  # name -> (library weighting, the anchor's loss of the student logits, factor)
        "confidence": (lambda s: np.sum(np_confidence(zt, y) * np_kl(s)) / (b * k), 1 / k),
        "entropy": (lambda s: np.sum((1 - h / h.sum(0)) * np_kl(s)) / (b * k), (k - 1) / k),
        "uniform": (lambda s: np.sum(np_kl(s).mean(1)), k),
    }
    for name, (np_loss, factor) in anchors.items():
        dt = distill_targets(jnp.asarray(zt, jnp.float32), jnp.asarray(y), temperature=t,
                             weighting=name)

        def lib(s, dt=dt):
            return mean_distillation_loss(s, dt.targets, temperature=t).loss

        grad = np.asarray(jax.grad(lib)(jnp.asarray(s0, jnp.float32)), np.float64)
        eps, np_grad = 1e-6, np.zeros_like(s0)
        for i in np.ndindex(s0.shape):
            d = np.zeros_like(s0)
            d[i] = eps
            np_grad[i] = (np_loss(s0 + d) - np_loss(s0 - d)) / (2 * eps)
        np.testing.assert_allclose(np_grad, factor * grad, rtol=1e-4, atol=1e-7, err_msg=name)
        per_teacher = float(jnp.mean(per_teacher_soft_kl(jnp.asarray(s0, jnp.float32),
                                                         dt.probs, dt.weights, temperature=t)))
        np.testing.assert_allclose(np_loss(s0), factor * per_teacher, rtol=1e-5, err_msg=name)
