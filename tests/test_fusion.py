"""Fusion honesty: the three ways to combine teachers, and how they differ.

1. KL to the weighted-mean teacher distribution, `soft_kl(s, fuse_targets(p, w))` (default);
2. the weighted mean of per-teacher KLs, `per_teacher_soft_kl(s, p, w)`: the same gradient in
   the student logits, a larger value, by `T^2 * sum_k w_k KL(p_k || pbar)` (a generalized
   Jensen-Shannon divergence of the teachers that does not depend on the student);
3. the softmax of the mean of raw logits, `fuse_logits` (TextBrewer's choice): a different
   target, equal to the probability mean only when the teachers agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHAPE, np_softmax

from mtkd_jax import fuse_targets, per_teacher_soft_kl, soft_kl
from mtkd_jax.objective.targets import fuse_logits


# ---------------------------------------------------------------- float64 NumPy references
def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / q), 0.0), -1)


def np_expand(w, ndim):
    w = np.asarray(w, np.float64)
    return w.reshape(w.shape + (1,) * (ndim - w.ndim))


def np_generalized_js(p, w):
    """`sum_k w_k KL(p_k || pbar)`, `pbar = sum_k w_k p_k`: `[K, ..., C], [K, ...] -> [...]`."""
    p = np.asarray(p, np.float64)
    pbar = np.sum(np_expand(w, p.ndim) * p, axis=0)
    return np.sum(np_expand(w, p.ndim - 1) * np.stack([np_kl(pk, pbar) for pk in p]), axis=0)


def random_case(rng, temperature):
    z_teachers = 3.0 * rng.standard_normal(SHAPE)
    p = np_softmax(z_teachers, temperature).astype(np.float32)
    s = (2.0 * rng.standard_normal(SHAPE[1:])).astype(np.float32)
    w = np.moveaxis(rng.dirichlet(np.ones(SHAPE[0]), size=SHAPE[1:-1]), -1, 0).astype(np.float32)
    return s, p, w


def _both(s, p, w, temperature):
    kl_of_mean = soft_kl(s, fuse_targets(p, w), temperature=temperature)
    mean_of_kls = per_teacher_soft_kl(s, p, w, temperature=temperature)
    return kl_of_mean, mean_of_kls


_both_jit = jax.jit(_both)
_grads_jit = jax.jit(jax.grad(lambda s, p, w, t, i: jnp.sum(_both(s, p, w, t)[i]), argnums=0),
                     static_argnums=4)


# ---------------------------------------------------------------- KL of mean vs mean of KLs
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_same_gradient_different_value(rng, temperature):
    s, p, w = random_case(rng, temperature)
    kl_of_mean, mean_of_kls = (np.asarray(x) for x in _both_jit(s, p, w, temperature))
    g_mean = _grads_jit(s, p, w, temperature, 0)
    g_kls = _grads_jit(s, p, w, temperature, 1)
    # Same gradient wrt the student logits, to float32 tolerance ...
    np.testing.assert_allclose(g_mean, g_kls, rtol=1e-4, atol=1e-6)
    # ... and the gradient is T * (softmax(s/T) - pbar), per example.
    pbar = np.sum(w[..., None] * p.astype(np.float64), axis=0)
    np.testing.assert_allclose(g_mean, temperature * (np_softmax(s, temperature) - pbar),
                               rtol=1e-4, atol=1e-6)
    # ... but different values: the mean of KLs is larger everywhere (teachers disagree).
    assert np.all(mean_of_kls > kl_of_mean + 1e-3)
    # The gap is T^2 times the teachers' generalized JS divergence, independent of s.
    gap = temperature**2 * np_generalized_js(p, w)
    np.testing.assert_allclose(mean_of_kls - kl_of_mean, gap, rtol=1e-4, atol=1e-5)
    s2 = s + 5.0 * rng.standard_normal(s.shape).astype(np.float32)
    kl_of_mean2, mean_of_kls2 = (np.asarray(x) for x in _both_jit(s2, p, w, temperature))
    np.testing.assert_allclose(mean_of_kls2 - kl_of_mean2, gap, rtol=1e-4, atol=1e-5)


def test_identity_in_float64(rng):
    # The same identity in float64, to tight tolerance, with per-teacher weights `[K]`.
    with jax.enable_x64(True):
        p = rng.dirichlet(np.ones(6), size=(4, 3))
        s = 3.0 * rng.standard_normal((3, 6))
        w = rng.dirichlet(np.ones(4))
        for temperature in (1.0, 2.5):
            kl_of_mean, mean_of_kls = _both_jit(s, p, w, temperature)
            assert kl_of_mean.dtype == jnp.float64
            np.testing.assert_allclose(mean_of_kls - kl_of_mean,
                                       temperature**2 * np_generalized_js(p, w[:, None]),
                                       rtol=1e-10, atol=1e-12)
            g_mean, g_kls = (_grads_jit(s, p, w, temperature, i) for i in (0, 1))
            np.testing.assert_allclose(g_mean, g_kls, rtol=1e-10, atol=1e-12)


def test_agreeing_teachers_have_no_gap(rng):
    s, p, w = random_case(rng, 1.0)
    same = np.broadcast_to(p[:1], p.shape)  # all teachers identical
    kl_of_mean, mean_of_kls = _both_jit(s, same, w, 1.0)
    np.testing.assert_allclose(mean_of_kls, kl_of_mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- mean of logits
def test_fuse_logits_differs_from_probability_mean():
    # One confident teacher and one unsure teacher. The probability mean keeps the unsure
    # teacher's hedging; the logit mean, softmaxed, does not.
    z = np.array([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    p = np_softmax(z)
    prob_mean = np.asarray(fuse_targets(p.astype(np.float32), np.full(2, 0.5, np.float32)))
    logit_mean = np.asarray(fuse_logits(z))
    np.testing.assert_allclose(prob_mean, p.mean(0), rtol=1e-6)
    np.testing.assert_allclose(logit_mean, np_softmax(z.mean(0)), rtol=1e-6)
    assert np.abs(logit_mean - prob_mean).max() > 0.05


def test_fuse_logits_lets_large_logits_dominate():
    # Teacher 1 has the same ranking as teacher 0 reversed, but 10x larger logits: the logit
    # mean follows teacher 1, the probability mean is split between them.
    z = np.array([[1.0, 0.0], [0.0, 10.0]], np.float32)
    p = np_softmax(z).astype(np.float32)
    assert fuse_logits(z)[1] > 0.98
    np.testing.assert_allclose(fuse_targets(p, np.full(2, 0.5, np.float32)), p.mean(0),
                               rtol=1e-6)
    assert fuse_targets(p, np.full(2, 0.5, np.float32))[1] < 0.9


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_fuse_logits_equals_probability_mean_when_teachers_agree(rng, temperature):
    z = (3.0 * rng.standard_normal(SHAPE[1:])).astype(np.float32)
    # Teachers agree as distributions: same logits up to a per-teacher, per-example shift.
    shift = (5.0 * rng.standard_normal((SHAPE[0],) + SHAPE[1:-1] + (1,))).astype(np.float32)
    z_teachers = z[None] + shift
    w = np.moveaxis(rng.dirichlet(np.ones(SHAPE[0]), size=SHAPE[1:-1]), -1, 0).astype(np.float32)
    p = np.asarray(jax.nn.softmax(z_teachers / temperature))
    by_logits = fuse_logits(z_teachers, w, temperature=temperature)
    by_probs = fuse_targets(p, w)
    np.testing.assert_allclose(by_logits, by_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_logits, np_softmax(z, temperature), rtol=1e-5, atol=1e-6)


def test_three_fusions_side_by_side():
    # The article's worked example, as teacher logits (log-probabilities).
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.4, 0.5]], np.float32)
    w = np.full(2, 0.5, np.float32)
    s = np.zeros(3, np.float32)
    np.testing.assert_allclose(fuse_targets(p, w), [0.15, 0.35, 0.5], rtol=1e-6)
    # Logit mean: softmax of the mean log-probability = normalised geometric mean.
    geo = np.sqrt(p[0].astype(np.float64) * p[1])
    np.testing.assert_allclose(fuse_logits(np.log(p), w), geo / geo.sum(), rtol=1e-5)
    kl_of_mean, mean_of_kls = _both_jit(s, p, w, 1.0)
    np.testing.assert_allclose(kl_of_mean, np_kl([0.15, 0.35, 0.5], np.full(3, 1 / 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(mean_of_kls - kl_of_mean, np_generalized_js(p, w), rtol=1e-3)
