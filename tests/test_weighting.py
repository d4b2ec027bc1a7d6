"""Tests for mtkd_jax.weighting: every strategy against a float64 NumPy reference, jitted and
with extra batch dims, gradients, properties (non-negative, sum to 1, permutation), bad input,
and `get_weighting`."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mtkd_jax import weighting

SHAPE = (3, 2, 4, 5)  # [K, B1, B2, C]
K = SHAPE[0]
TOL = dict(rtol=2e-5, atol=2e-6)
KINDS = ("squared", "euclidean", "kl", "js")


# ---------------------------------------------------------------- float64 NumPy references
def np_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_per_teacher(v, probs):
    """`[K]` -> `[K, ...]` broadcast over the batch dims of `[K, ..., C]`."""
    v = np.asarray(v, np.float64)
    return np.broadcast_to(v.reshape((-1,) + (1,) * (probs.ndim - 2)), probs.shape[:-1])


def np_static(lambdas, probs):
    lam = np.asarray(lambdas, np.float64)
    return np_per_teacher(lam / lam.sum(), probs)


def np_from_scores(scores, probs, temperature=1.0):
    return np_per_teacher(np_softmax(np.asarray(scores, np.float64) / temperature), probs)


def np_confidence(logits, labels):
    logp = np_log_softmax(logits)  # [K, ..., C]
    ce = -np.take_along_axis(logp, np.asarray(labels)[None, ..., None], axis=-1)[..., 0]
    k = logits.shape[0]
    return (1.0 - np_softmax(ce, axis=0)) / (k - 1)


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


def random_probs(rng, shape=SHAPE):
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)


def random_logits(rng, shape=SHAPE, scale=2.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def random_labels(rng, shape=SHAPE):
    return rng.integers(0, shape[-1], size=shape[1:-1]).astype(np.int32)


# ---------------------------------------------------------------- values: eager, jit, batched
def _check(fn, args, expected):
    """Under `jax.jit` (eager calls are covered by `test_eager_float64_numpy_inputs`)."""
    out = jax.jit(fn)(*args)
    assert out.shape == expected.shape, (out.shape, expected.shape)
    np.testing.assert_allclose(out, expected, **TOL)


def test_uniform_matches_reference(rng):
    p = random_probs(rng)
    _check(weighting.uniform, (p,), np.full(SHAPE[:-1], 1.0 / K))


def test_static_matches_reference(rng):
    p = random_probs(rng)
    lam = rng.uniform(0.1, 3.0, size=K).astype(np.float32)
    _check(weighting.static, (lam, p), np_static(lam, p))
    # A zero lambda is allowed (that teacher is switched off), integers are accepted.
    _check(weighting.static, (np.array([0, 1, 3]), p), np_static([0, 1, 3], p))


def test_from_scores_matches_reference(rng):
    p = random_probs(rng)
    scores = rng.uniform(0.6, 0.95, size=K).astype(np.float32)
    fn = jax.jit(lambda s, p, t: weighting.from_scores(s, p, temperature=t))
    for t in (0.05, 1.0, 10.0):  # traced temperature
        np.testing.assert_allclose(fn(scores, p, t), np_from_scores(scores, p, t), **TOL)


def test_from_scores_temperature_limits():
    p = np.full((3, 1, 2), 0.5, np.float32)
    scores = np.array([0.7, 0.9, 0.8], np.float32)
    np.testing.assert_allclose(weighting.from_scores(scores, p, temperature=1e-3)[:, 0],
                               [0.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(weighting.from_scores(scores, p, temperature=1e4)[:, 0],
                               1.0 / 3, atol=1e-4)


def test_confidence_matches_reference(rng):
    z, y = random_logits(rng), random_labels(rng)
    _check(weighting.confidence, (z, y), np_confidence(z, y))


def test_confidence_prefers_the_teacher_that_is_right():
    # Teacher 0 is confidently right, teacher 1 unsure, teacher 2 confidently wrong.
    z = np.array([[[6.0, 0.0]], [[0.0, 0.0]], [[0.0, 6.0]]], np.float32)
    w = np.asarray(weighting.confidence(z, np.array([0])))[:, 0]
    assert w[0] > w[1] > w[2]
    np.testing.assert_allclose(w, np_confidence(z, np.array([0]))[:, 0], **TOL)


def test_entropy_matches_reference(rng):
    p = random_probs(rng)
    _check(weighting.entropy, (p,), np_entropy(p))


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
        weighting.uniform(p), weighting.entropy(p), weighting.confidence(z, jnp.array([0, 2])),
        weighting.static(jnp.array([2.0]), p), weighting.from_scores(jnp.array([0.3]), p)))(p, z)
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
        (weighting.static(lam, p), np_static(lam, p)),
        (weighting.from_scores(scores, p), np_from_scores(scores, p)),
        (weighting.entropy(p), np_entropy(p)),
        (weighting.confidence(z, y), np_confidence(z, y)),
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
            ws = (weighting.static(lam, p), weighting.from_scores(scores, p, temperature=t),
                  weighting.confidence(z, y), weighting.entropy(p),
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
        return sum(jnp.sum(rr * w) for w in ws) + jnp.sum(r * weighting.confidence(z, y))

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z, zero_probs)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- properties (hypothesis)
def _all_strategies(z, y, lam, scores):
    p = jax.nn.softmax(z)
    out = {
        "uniform": weighting.uniform(p),
        "static": weighting.static(lam, p),
        "from_scores": weighting.from_scores(scores, p, temperature=0.3),
        "confidence": weighting.confidence(z, y),
        "entropy": weighting.entropy(p),
    }
    out.update({f"agreement_{kind}": weighting.agreement(p, kind=kind, sharpness=5.0)
                for kind in KINDS})
    return out


_all_strategies_jit = jax.jit(_all_strategies)


@st.composite
def strategy_inputs(draw):
    """Logits `[4, 3, 5]` (large magnitudes included), labels, lambdas (zeros allowed), scores."""
    z = draw(hnp.arrays(np.float32, (4, 3, 5), elements=st.floats(-60, 60, width=32)))
    y = draw(hnp.arrays(np.int32, (3,), elements=st.integers(0, 4)))
    lam = draw(hnp.arrays(np.float32, (4,), elements=st.floats(0, 10, width=32)))
    lam[0] += lam.sum() == 0
    scores = draw(hnp.arrays(np.float32, (4,), elements=st.floats(0, 1, width=32)))
    return z, y, lam, scores


@settings(max_examples=15)
@given(inputs=strategy_inputs())
def test_property_nonnegative_and_sum_to_one(inputs):
    for name, w in _all_strategies_jit(*inputs).items():
        w = np.asarray(w)
        assert w.shape == (4, 3), name
        assert np.all(np.isfinite(w)) and np.all(w >= 0), name
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5, err_msg=name)


@settings(max_examples=10)
@given(inputs=strategy_inputs(), perm=st.permutations(range(4)))
def test_property_weights_permute_with_teachers(inputs, perm):
    z, y, lam, scores = inputs
    perm = np.asarray(perm)
    w = _all_strategies_jit(z, y, lam, scores)
    w_perm = _all_strategies_jit(z[perm], y, lam[perm], scores[perm])
    for name in w:
        np.testing.assert_allclose(w_perm[name], np.asarray(w[name])[perm], rtol=1e-5,
                                   atol=1e-6, err_msg=name)


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
        weighting.static(lambdas, P)


def test_traced_lambdas_are_not_checked_but_work():
    w = jax.jit(weighting.static)(jnp.array([1.0, 1.0, 2.0]), P)
    np.testing.assert_allclose(w[:, 0], [0.25, 0.25, 0.5])


def test_from_scores_bad_input():
    with pytest.raises(ValueError, match=r"`scores` must have shape \[K\]=\(3,\)"):
        weighting.from_scores(np.ones(4), P)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"`temperature` must be > 0"):
            weighting.from_scores(np.ones(3), P, temperature=t)


def test_confidence_bad_labels():
    z = np.zeros((3, 2, 4), np.float32)
    with pytest.raises(TypeError, match=r"`labels` must be integer class indices"):
        weighting.confidence(z, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\)"):
        weighting.confidence(z, np.zeros(3, np.int32))
    with pytest.raises(TypeError, match=r"`teacher_logits` must be a floating-point array"):
        weighting.confidence(z.astype(np.int32), np.zeros(2, np.int32))


def test_agreement_bad_input():
    with pytest.raises(ValueError, match=r"`probs` holds 1 teacher.*at least 2"):
        weighting.agreement(P[:1])
    with pytest.raises(ValueError, match=r"`sharpness` must be >= 0"):
        weighting.agreement(P, sharpness=-1.0)
    with pytest.raises(ValueError, match=r"`kind` must be one of \['euclidean', 'js', 'kl', "):
        weighting.agreement(P, kind="cosine")


@pytest.mark.parametrize("fn", [weighting.uniform, weighting.entropy, weighting.agreement,
                                functools.partial(weighting.static, np.ones(3))])
def test_integer_or_flat_probs(fn):
    with pytest.raises(TypeError, match=r"`probs` must be a floating-point array"):
        fn(np.ones((3, 2, 4), np.int32))
    with pytest.raises(ValueError, match=r"`probs` must have at least 2 dims"):
        fn(np.full(4, 0.25, np.float32))


# ---------------------------------------------------------------- get_weighting
def test_get_weighting_each_name(rng):
    p = random_probs(rng, (3, 2, 4))
    z, y = random_logits(rng, (3, 2, 4)), random_labels(rng, (3, 2, 4))
    lam, scores = np.array([1.0, 2.0, 5.0], np.float32), np.array([0.5, 0.9, 0.7], np.float32)
    expected = {
        "uniform": np.full((3, 2), 1 / 3),
        "confidence": np_confidence(z, y),
        "entropy": np_entropy(p),
        "agreement": np_agreement(p),
    }
    assert sorted(weighting.WEIGHTINGS) == sorted(expected)
    for name, ref in expected.items():
        fn = weighting.get_weighting(name)
        np.testing.assert_allclose(fn(p, logits=z, labels=y), ref, **TOL, err_msg=name)
    cases = [
        (weighting.get_weighting("static", lambdas=lam), np_static(lam, p)),
        (weighting.get_weighting("scores", scores=scores), np_from_scores(scores, p)),
        (weighting.get_weighting("scores", scores=scores, temperature=0.1),
         np_from_scores(scores, p, 0.1)),
        (weighting.get_weighting("agreement", kind="kl", sharpness=4.0),
         np_agreement(p, "kl", 4.0)),
    ]
    for fn, ref in cases:
        np.testing.assert_allclose(fn(p, logits=z, labels=y), ref, **TOL)
        # Resolved strategies are jit-safe closures.
        np.testing.assert_allclose(jax.jit(lambda p, z, y, fn=fn: fn(p, logits=z, labels=y))(
            p, z, y), ref, **TOL)


def test_get_weighting_passes_callables_through():
    def mine(probs, *, logits=None, labels=None):
        return weighting.uniform(probs)

    assert weighting.get_weighting(mine) is mine
    with pytest.raises(ValueError, match=r"callable weighting .* takes no hyperparameters"):
        weighting.get_weighting(mine, sharpness=2.0)


def test_get_weighting_bad_names_and_hyperparameters():
    with pytest.raises(ValueError, match=r"Unknown weighting 'best'; valid names: \['agreement', "
                                         r"'confidence', 'entropy', 'scores', 'static', "
                                         r"'uniform'\]"):
        weighting.get_weighting("best")
    with pytest.raises(ValueError, match=r"'static' needs \['lambdas'\].*missing \['lambdas'\]"):
        weighting.get_weighting("static")
    with pytest.raises(ValueError, match=r"'scores' needs \['scores'\].*missing \['scores'\]"):
        weighting.get_weighting("scores", temperature=2.0)
    with pytest.raises(ValueError, match=r"'uniform'.*unknown \['sharpness'\]"):
        weighting.get_weighting("uniform", sharpness=1.0)
    with pytest.raises(ValueError, match=r"'static'.*unknown \['lambda'\]"):
        weighting.get_weighting("static", lambdas=np.ones(3), **{"lambda": 1})
    with pytest.raises(ValueError, match=r"'confidence' needs `logits`.*and `labels`"):
        weighting.get_weighting("confidence")(P, logits=None, labels=None)
