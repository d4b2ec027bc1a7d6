"""Tests for mtkd_jax.core.divergence: softmax_t, log_softmax_t, pairwise_divergence.

Every numerical check compares against a float64 NumPy reference written here, on fresh
random inputs, eagerly and under `jax.jit`, with extra leading batch dims `[K, B1, B2, C]`.
Gradients are checked in float64 (`jax.enable_x64`) so that finite differences are accurate.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mtkd_jax import DIVERGENCES, log_softmax_t, pairwise_divergence, softmax_t

KINDS = ("squared", "euclidean", "kl", "js")
SYMMETRIC = ("squared", "euclidean", "js")
SHAPE = (3, 2, 4, 5)  # [K, B1, B2, C]
TOL = dict(rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- float64 NumPy references
def np_log_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z, temperature=1.0):
    return np.exp(np_log_softmax(z, temperature))


def np_kl(p, q):
    """KL(p || q) over the last axis, 0 log 0 = 0; q > 0 wherever p > 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    pos = p > 0
    return np.sum(np.where(pos, p * (np.log(np.where(pos, p, 1.0)) - np.log(np.where(pos, q, 1.0))),
                           0.0), axis=-1)


def np_divergence(pi, pj, kind):
    pi, pj = np.asarray(pi, np.float64), np.asarray(pj, np.float64)
    sq = np.sum((pi - pj) ** 2, axis=-1)
    if kind == "squared":
        return sq
    if kind == "euclidean":
        return np.sqrt(sq)
    if kind == "kl":
        return np_kl(pi, pj)
    m = 0.5 * (pi + pj)
    return 0.5 * np_kl(pi, m) + 0.5 * np_kl(pj, m)


def np_pairwise(probs, kind):
    """`[K, ..., C] -> [..., K, K]` by explicit loops over teacher pairs."""
    k = probs.shape[0]
    out = np.zeros(probs.shape[1:-1] + (k, k))
    for i in range(k):
        for j in range(k):
            out[..., i, j] = np_divergence(probs[i], probs[j], kind)
    return out


def random_probs(rng, shape=SHAPE, dtype=np.float32):
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(dtype)


def probs_with_zeros():
    """Teachers with exact zeros: one-hot, a zero another teacher believes in, duplicates."""
    return np.array(
        [
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
            [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]],
            [[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]],
        ],
        np.float32,
    )


# ---------------------------------------------------------------- softmax_t / log_softmax_t
def test_softmax_t_matches_reference(rng):
    z = (3.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    both = jax.jit(lambda z, t: (softmax_t(z, temperature=t), log_softmax_t(z, temperature=t)))
    for t in (0.5, 1.0, 4.0):  # a traced temperature: one trace for all
        p, log_p = both(z, t)
        assert p.shape == SHAPE and p.dtype == jnp.float32
        np.testing.assert_allclose(p, np_softmax(z, t), **TOL)
        np.testing.assert_allclose(log_p, np_log_softmax(z, t), **TOL)
    # Eagerly, with a Python-number temperature.
    np.testing.assert_allclose(softmax_t(z, temperature=2.0), np_softmax(z, 2.0), **TOL)
    np.testing.assert_allclose(log_softmax_t(z, temperature=2.0), np_log_softmax(z, 2.0), **TOL)


def test_softmax_t_sums_to_one_and_flattens_with_temperature(rng):
    z = (5.0 * rng.standard_normal((4, 6))).astype(np.float32)
    np.testing.assert_allclose(softmax_t(z, temperature=2.0).sum(-1), 1.0, rtol=1e-6)
    # Higher temperature -> higher entropy, for every row.
    h = [-(np_softmax(z, t) * np_log_softmax(z, t)).sum(-1) for t in (0.5, 1.0, 8.0)]
    assert np.all(h[0] < h[1]) and np.all(h[1] < h[2])
    np.testing.assert_allclose(softmax_t(z, temperature=1e4), 1.0 / 6, atol=1e-3)


def test_softmax_t_grads(rng):
    with jax.enable_x64(True):
        z = rng.standard_normal((2, 3, 4))
        r1, r2 = rng.standard_normal((2, 2, 3, 4))
        # Both functions in one scalar, with independent random cotangents, in logits and T.
        f = lambda z, t: jnp.sum(r1 * softmax_t(z, temperature=t) + r2 * log_softmax_t(
            z, temperature=t))
        check_grads(jax.jit(f), (z, 1.7), order=2, modes=["rev"], eps=1e-6)


def test_softmax_t_finite_grads_at_extreme_logits(rng):
    z = rng.choice([-50.0, 50.0], size=SHAPE).astype(np.float32)
    z[..., 0] = 50.0  # ties at the top as well as huge gaps
    r1, r2 = rng.standard_normal((2,) + SHAPE).astype(np.float32)
    f = lambda z, t: jnp.sum(r1 * softmax_t(z, temperature=t) + r2 * log_softmax_t(
        z, temperature=t))
    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    for t in (0.5, 1.0, 4.0):
        value, (g_z, g_t) = value_and_grad(z, t)
        assert np.isfinite(value) and np.all(np.isfinite(g_z)) and np.isfinite(g_t)


# ---------------------------------------------------------------- pairwise_divergence
def test_article_worked_example():
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.4, 0.5]], np.float32)
    d = pairwise_divergence(p, kind="squared")  # eagerly, as in the doctest
    np.testing.assert_allclose(d, [[0.0, 0.02], [0.02, 0.0]], rtol=1e-5, atol=1e-7)
    d = _all_kinds_jit(p)
    np.testing.assert_allclose(d["squared"][0, 1], 0.02, rtol=1e-5)
    np.testing.assert_allclose(d["euclidean"][0, 1], np.sqrt(0.02), rtol=1e-5)
    np.testing.assert_allclose(d["kl"], np_pairwise(p, "kl"), **TOL)


def _all_kinds(p):
    return {kind: pairwise_divergence(p, kind=kind) for kind in KINDS}


_all_kinds_jit = jax.jit(_all_kinds)


def test_pairwise_matches_reference(rng):
    p = random_probs(rng)
    for kind, d in _all_kinds_jit(p).items():
        assert d.shape == SHAPE[1:-1] + (SHAPE[0], SHAPE[0])  # [B1, B2, K, K]
        np.testing.assert_allclose(d, np_pairwise(p, kind), **TOL, err_msg=kind)


def test_pairwise_minimal_shape_and_registry(rng):
    p = random_probs(rng, (2, 4))  # [K, C]: no batch dims at all
    for kind, d in _all_kinds_jit(p).items():
        np.testing.assert_allclose(d, np_pairwise(p, kind), **TOL, err_msg=kind)
    # The registry's functions take one pair `[..., C], [..., C] -> [...]`.
    assert sorted(DIVERGENCES) == sorted(KINDS)
    pairs = jax.jit(lambda a, b: {kind: fn(a, b) for kind, fn in DIVERGENCES.items()})
    for kind, d in pairs(p[0], p[1]).items():
        np.testing.assert_allclose(d, np_divergence(p[0], p[1], kind), **TOL, err_msg=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_exact_zeros_are_finite(kind):
    p = probs_with_zeros()
    d = np.asarray(_all_kinds_jit(p)[kind])
    assert np.all(np.isfinite(d))
    assert np.all(d >= 0)
    if kind == "kl":
        # KL(p_i || p_j) is +inf in exact arithmetic where p_j = 0 < p_i; here it is clipped to
        # a large finite value, and it stays exact where p_j > 0 wherever p_i > 0.
        assert d[0, 0, 1] > 50.0 and d[1, 0, 2] > 50.0 and d[0, 2, 0] > 50.0
        np.testing.assert_allclose(d[0, 0, 2], np_kl(p[0, 0], p[2, 0]), **TOL)  # -log 0.2
    else:
        np.testing.assert_allclose(d, np_pairwise(p, kind), **TOL)
    np.testing.assert_allclose(d[1, 0, 1], 0.0, atol=1e-7)  # teachers 0, 1 agree on example 1


def _weighted_sum_of_kinds(p, r):
    """All kinds in one scalar, each with its own random cotangent `r[kind] [..., K, K]`."""
    return sum(jnp.sum(r[i] * d) for i, d in enumerate(_all_kinds(p).values()))


def test_pairwise_grads(rng):
    with jax.enable_x64(True):
        # Strictly positive probabilities, distinct teachers: the smooth region.
        p = rng.dirichlet(np.full(4, 3.0), size=(3, 2))
        r = rng.standard_normal((len(KINDS), 2, 3, 3))
        f = jax.jit(lambda p: _weighted_sum_of_kinds(p, r))
        check_grads(f, (p,), order=1, modes=["rev"], eps=1e-6)


def test_pairwise_finite_grads_at_zeros_and_extreme_logits(rng):
    r = rng.standard_normal((len(KINDS), 2, 3, 3)).astype(np.float32)
    p = probs_with_zeros()
    z = rng.choice([-50.0, 50.0], size=(3, 2, 3)).astype(np.float32)
    z[1] = z[0]  # two teachers that agree exactly: euclidean's sqrt at 0 off the diagonal
    # One scalar, one compile: a sum of gradients is finite only if every term is.
    f = lambda p, z: _weighted_sum_of_kinds(p, r) + _weighted_sum_of_kinds(softmax_t(z), r)
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, z)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- properties (hypothesis)
# One jitted function for all kinds and a couple of fixed shapes keep compilation to a few
# traces; hypothesis varies the values (exact zeros included).
_all_kinds = jax.jit(lambda p: {kind: pairwise_divergence(p, kind=kind) for kind in KINDS})


@st.composite
def teacher_probs(draw, teachers=(2, 4)):
    """`[K, 3, 4]` float32 probabilities with exact zeros allowed."""
    k = draw(st.sampled_from(teachers))
    raw = draw(
        hnp.arrays(np.float64, (k, 3, 4), elements=st.floats(0.0, 1.0, allow_subnormal=False)))
    raw[..., 0] += raw.sum(-1) == 0  # no all-zero rows
    return (raw / raw.sum(-1, keepdims=True)).astype(np.float32)


@settings(max_examples=15)
@given(p=teacher_probs())
def test_property_nonnegative_zero_diagonal_symmetry(p):
    for kind, d in _all_kinds(p).items():
        d = np.asarray(d)
        assert np.all(np.isfinite(d))
        assert np.all(d >= -1e-6), kind  # KL >= 0 (up to float32 rounding); others too
        np.testing.assert_array_equal(np.diagonal(d, axis1=-2, axis2=-1), 0.0)
        if kind in SYMMETRIC:
            np.testing.assert_allclose(d, np.swapaxes(d, -1, -2), rtol=1e-6, atol=1e-7)
        if kind == "js":
            assert np.all(d <= np.log(2.0) + 1e-6)


@settings(max_examples=15)
@given(p=teacher_probs(teachers=(2,)))
def test_property_identical_teachers_have_zero_divergence(p):
    # KL(p, p) = 0 off the diagonal too: duplicate the teachers, so that the zero is computed,
    # not masked.
    dup = np.concatenate([p, p], axis=0)
    idx = np.arange(2)
    for kind, d in _all_kinds(dup).items():
        np.testing.assert_allclose(np.asarray(d)[..., idx, idx + 2], 0.0, atol=1e-6,
                                   err_msg=kind)


@settings(max_examples=10)
@given(p=teacher_probs(teachers=(4,)), perm=st.permutations(range(4)))
def test_property_permuting_teachers_permutes_matrix(p, perm):
    perm = np.asarray(perm)
    d, d_perm = _all_kinds(p), _all_kinds(p[perm])
    for kind in KINDS:
        np.testing.assert_allclose(d_perm[kind], np.asarray(d[kind])[..., perm[:, None], perm],
                                   rtol=1e-6, atol=1e-7, err_msg=kind)


# ---------------------------------------------------------------- bad input
def test_unknown_kind_lists_valid_names():
    with pytest.raises(ValueError, match=r"`kind` must be one of \['euclidean', 'js', 'kl', "
                                         r"'squared'\], got 'cosine'"):
        pairwise_divergence(np.full((2, 3), 1 / 3, np.float32), kind="cosine")


def test_pairwise_needs_two_teachers():
    with pytest.raises(ValueError, match=r"`probs` holds 1 teacher.*at least 2"):
        pairwise_divergence(np.full((1, 4, 3), 1 / 3, np.float32))


def test_pairwise_needs_teacher_and_class_axes():
    with pytest.raises(ValueError, match=r"`probs` must have at least 2 dims \(\[K, \.\.\., C\]"):
        pairwise_divergence(np.full((3,), 1 / 3, np.float32))


def test_integer_inputs_are_type_errors():
    with pytest.raises(TypeError, match=r"`probs` must be a floating-point array.*int"):
        pairwise_divergence(np.ones((2, 3), np.int32))
    for fn in (softmax_t, log_softmax_t):
        with pytest.raises(TypeError, match=r"`logits` must be a floating-point array"):
            fn(jnp.arange(3))


@pytest.mark.parametrize(
    "temperature", [0.0, -1.0, np.float32(0.0), np.array(-2.0), jnp.array(0.0), float("nan")]
)
def test_nonpositive_temperature(temperature):
    for fn in (softmax_t, log_softmax_t):
        with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
            fn(jnp.zeros(3), temperature=temperature)
