"""Tests for mtkd_jax.objective.targets: fuse_targets, leave_one_out_targets, fuse_logits against
float64 NumPy references, jitted and batched, with gradients, properties and bad input."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mtkd_jax import fuse_logits, fuse_targets, leave_one_out_targets

SHAPE = (3, 2, 4, 5)  # [K, B1, B2, C]
K = SHAPE[0]
TOL = dict(rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- float64 NumPy references
def np_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_expand(w, probs):
    w = np.asarray(w, np.float64)
    return w.reshape(w.shape + (1,) * (probs.ndim - w.ndim))


def np_fuse(probs, weights):
    return np.sum(np_expand(weights, probs) * np.asarray(probs, np.float64), axis=0)


def np_loo(probs, weights=None):
    """Row k: weighted mean of the other teachers, by an explicit loop."""
    probs = np.asarray(probs, np.float64)
    k = probs.shape[0]
    w = np.ones(probs.shape[:-1]) if weights is None else np.broadcast_to(
        np_expand(weights, probs)[..., 0], probs.shape[:-1])
    rows = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        num = sum(w[j][..., None] * probs[j] for j in others)
        den = sum(w[j] for j in others)[..., None]
        uniform = sum(probs[j] for j in others) / (k - 1)
        rows.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), uniform))
    return np.stack(rows)


def np_fuse_logits(z, weights=None, temperature=1.0):
    z = np.asarray(z, np.float64)
    w = np.full(z.shape[0], 1.0 / z.shape[0]) if weights is None else weights
    return np_softmax(np.sum(np_expand(w, z) * z, axis=0), temperature)


def random_probs(rng, shape=SHAPE):
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)


def random_weights(rng, shape):
    """`[K, ...]` non-negative weights summing to 1 over K."""
    return np.moveaxis(rng.dirichlet(np.ones(shape[0]), size=shape[1:]), -1, 0).astype(np.float32)


def _check(fn, args, expected):
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    assert eager.shape == expected.shape, (eager.shape, expected.shape)
    np.testing.assert_allclose(eager, expected, **TOL)
    np.testing.assert_allclose(jitted, expected, **TOL)


# ---------------------------------------------------------------- fuse_targets
def test_article_worked_example():
    p = np.array([[0.2, 0.3, 0.5], [0.1, 0.4, 0.5]], np.float32)
    np.testing.assert_allclose(fuse_targets(p, np.array([0.5, 0.5], np.float32)),
                               [0.15, 0.35, 0.5], rtol=1e-6)
    # With two teachers the leave-one-out target of each model is the other model.
    np.testing.assert_allclose(leave_one_out_targets(p), p[::-1], rtol=1e-6)


@pytest.mark.parametrize("weights_shape", [(K,), SHAPE[:-1]], ids=["per-teacher", "per-example"])
def test_fuse_targets_matches_reference(rng, weights_shape):
    p, w = random_probs(rng), random_weights(rng, weights_shape)
    _check(fuse_targets, (p, w), np_fuse(p, w))
    np.testing.assert_allclose(fuse_targets(p, w).sum(-1), 1.0, rtol=1e-5)


def test_fuse_targets_uses_weights_as_given(rng):
    # Not renormalised: doubled (traced) weights double the result; concrete weights that do
    # not sum to 1 are refused instead of silently giving a target that is not a distribution.
    p, w = random_probs(rng), random_weights(rng, (K,))
    np.testing.assert_allclose(jax.jit(fuse_targets)(p, 2 * w), 2 * np_fuse(p, w), **TOL)
    with pytest.raises(ValueError, match=r"`weights` must sum to 1 over the teacher axis"):
        fuse_targets(p, 2 * w)


# ---------------------------------------------------------------- leave_one_out_targets
@pytest.mark.parametrize("weights_shape", [None, (K,), SHAPE[:-1]],
                         ids=["uniform", "per-teacher", "per-example"])
def test_leave_one_out_matches_reference(rng, weights_shape):
    p = random_probs(rng)
    if weights_shape is None:
        _check(leave_one_out_targets, (p,), np_loo(p))
    else:
        w = random_weights(rng, weights_shape)
        _check(leave_one_out_targets, (p, w), np_loo(p, w))


def test_leave_one_out_dominant_teacher_is_accurate(rng):
    # One teacher holds almost all the weight (e.g. `from_scores` at a low temperature). The
    # other teachers' targets divide two small numbers; subtracting teacher k's term from the
    # total (the first version) lost them to cancellation, with errors ~0.2.
    p = random_probs(rng, (3, 4, 5))
    w = np.array([1.0, 2e-9, 6e-9], np.float32)
    t = np.asarray(leave_one_out_targets(p, w))
    np.testing.assert_allclose(t, np_loo(p, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    w_ex = np.stack([np.full(4, 1.0), np.full(4, 1e-8), np.full(4, 3e-8)]).astype(np.float32)
    np.testing.assert_allclose(leave_one_out_targets(p, w_ex), np_loo(p, w_ex), rtol=1e-5,
                               atol=1e-6)


def test_leave_one_out_zero_weight_fallback():
    p = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]], np.float32)
    w = np.array([1.0, 0.0, 0.0], np.float32)  # the others of teacher 0 have no weight
    t = np.asarray(leave_one_out_targets(p, w))
    np.testing.assert_allclose(t[0, 0], [0.25, 0.75])  # uniform mean of teachers 1 and 2
    np.testing.assert_allclose(t[1, 0], [1.0, 0.0])
    np.testing.assert_allclose(t[2, 0], [1.0, 0.0])
    np.testing.assert_allclose(t, np_loo(p, w), **TOL)


# ---------------------------------------------------------------- fuse_logits
@pytest.mark.parametrize("weights_shape", [None, (K,), SHAPE[:-1]],
                         ids=["uniform", "per-teacher", "per-example"])
def test_fuse_logits_matches_reference(rng, weights_shape):
    z = (3.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    if weights_shape is None:
        fn = lambda z, t: fuse_logits(z, temperature=t)
        _check(fn, (z, 2.0), np_fuse_logits(z, None, 2.0))
    else:
        w = random_weights(rng, weights_shape)
        fn = lambda z, w, t: fuse_logits(z, w, temperature=t)
        _check(fn, (z, w, 2.0), np_fuse_logits(z, w, 2.0))


# ---------------------------------------------------------------- gradients
def test_grads(rng):
    with jax.enable_x64(True):
        p = rng.dirichlet(np.ones(4), size=(3, 2))
        w = np.moveaxis(rng.dirichlet(np.ones(3), size=2), -1, 0)  # [K, B]
        z = rng.standard_normal((3, 2, 4))
        r = rng.standard_normal((4, 3, 2, 4))

        def f(p, w, z, t):
            return (jnp.sum(r[0, 0] * fuse_targets(p, w))
                    + jnp.sum(r[1] * leave_one_out_targets(p))
                    + jnp.sum(r[2] * leave_one_out_targets(p, w))
                    + jnp.sum(r[3, 0] * fuse_logits(z, w, temperature=t)))

        check_grads(jax.jit(f), (p, w, z, 1.5), order=1, modes=["rev"], eps=1e-6)


def test_finite_grads_at_extreme_logits(rng):
    z = rng.choice([-50.0, 50.0], size=(3, 2, 4)).astype(np.float32)
    w = np.array([1.0, 0.0, 0.0], np.float32)  # zero weights: the fallback branch
    r = rng.standard_normal((3, 2, 4)).astype(np.float32)

    def f(z, w):
        p = jax.nn.softmax(z)
        return (jnp.sum(r[0] * fuse_targets(p, w)) + jnp.sum(r * leave_one_out_targets(p, w))
                + jnp.sum(r * leave_one_out_targets(p)) + jnp.sum(r[0] * fuse_logits(z, w)))

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z, w)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- properties (hypothesis)
@st.composite
def probs_and_weights(draw, k=3):
    """`[k, 2, 4]` float32 probabilities (exact zeros allowed) and `[k, 2]` weights."""
    raw = draw(hnp.arrays(np.float64, (k, 2, 4), elements=st.floats(0, 1, allow_subnormal=False)))
    raw[..., 0] += raw.sum(-1) == 0
    p = (raw / raw.sum(-1, keepdims=True)).astype(np.float32)
    rw = draw(hnp.arrays(np.float64, (k, 2), elements=st.floats(0, 1, allow_subnormal=False)))
    rw[0] += rw.sum(0) == 0
    return p, (rw / rw.sum(0)).astype(np.float32)


_targets = jax.jit(lambda p, w: (fuse_targets(p, w), leave_one_out_targets(p),
                                 leave_one_out_targets(p, w), fuse_logits(jnp.log(p + 1e-3), w)))


@settings(max_examples=15)
@given(pw=probs_and_weights(), perm=st.permutations(range(3)))
def test_property_permuting_teachers(pw, perm):
    p, w = pw
    perm = np.asarray(perm)
    fused, loo, loo_w, logit = _targets(p, w)
    fused_p, loo_p, loo_w_p, logit_p = _targets(p[perm], w[perm])
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_p, fused, **tol)  # fused target unchanged
    np.testing.assert_allclose(logit_p, logit, **tol)
    np.testing.assert_allclose(loo_p, np.asarray(loo)[perm], **tol)  # rows permute along
    np.testing.assert_allclose(loo_w_p, np.asarray(loo_w)[perm], **tol)
    for t in (fused, loo, loo_w, logit):  # every target is a distribution
        assert np.all(np.asarray(t) >= 0)
        np.testing.assert_allclose(np.sum(t, -1), 1.0, rtol=1e-5)


@settings(max_examples=15)
@given(pw=probs_and_weights(), k=st.integers(0, 2))
def test_property_one_hot_weights_give_single_teacher(pw, k):
    p, _ = pw
    one_hot = np.eye(3, dtype=np.float32)[k]
    fused, _, loo_w, logit = _targets(p, np.broadcast_to(one_hot[:, None], (3, 2)))
    # Exact up to XLA's CPU flushing of subnormals (e.g. 1.4e-45 -> 0).
    np.testing.assert_allclose(fused, p[k], rtol=0, atol=np.finfo(np.float32).tiny)
    np.testing.assert_allclose(logit, jax.nn.softmax(jnp.log(p[k] + 1e-3)), rtol=1e-5,
                               atol=1e-7)
    for j in range(3):  # every other teacher's leave-one-out target is teacher k
        if j != k:
            np.testing.assert_allclose(loo_w[j], p[k], rtol=1e-6, atol=1e-7)


@settings(max_examples=15)
@given(pw=probs_and_weights(k=4))
def test_property_uniform_leave_one_out_is_mean_of_others(pw):
    p, _ = pw
    t = np.asarray(leave_one_out_targets(p))
    uniform_w = np.full(4, 0.25, np.float32)
    np.testing.assert_allclose(leave_one_out_targets(p, uniform_w), t, rtol=1e-5, atol=1e-7)
    for k in range(4):
        others = np.delete(p, k, axis=0).astype(np.float64)
        np.testing.assert_allclose(t[k], others.mean(0), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad input
P = np.full((3, 2, 4), 0.25, np.float32)


def test_weights_must_match_teachers():
    for fn, arg in ((fuse_targets, "probs"), (leave_one_out_targets, "probs"),
                    (fuse_logits, "teacher_logits")):
        with pytest.raises(ValueError, match=rf"`weights` must have 3 teachers.*`{arg}`"):
            fn(P, np.full(2, 0.5, np.float32))
        with pytest.raises(ValueError, match=rf"`weights` must have shape \[K\]=\(3,\) or "
                                             rf"\[K, \.\.\.\]=\(3, 2\) to match `{arg}`"):
            fn(P, np.full((3, 4), 1 / 3, np.float32))
        with pytest.raises(TypeError, match=r"`weights` must be a floating-point array"):
            fn(P, np.array([1, 0, 0]))


def test_leave_one_out_needs_two_teachers():
    with pytest.raises(ValueError, match=r"`probs` holds 1 teacher.*at least 2"):
        leave_one_out_targets(P[:1])


def test_integer_inputs():
    with pytest.raises(TypeError, match=r"`probs` must be a floating-point array"):
        fuse_targets(np.ones((3, 2), np.int32), np.full(3, 1 / 3, np.float32))
    with pytest.raises(TypeError, match=r"`probs` must be a floating-point array"):
        leave_one_out_targets(np.ones((3, 2), np.int32))
    with pytest.raises(TypeError, match=r"`teacher_logits` must be a floating-point array"):
        fuse_logits(np.ones((3, 2), np.int32))


def test_fuse_logits_temperature():
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        fuse_logits(P, temperature=0.0)


def test_accepts_float64_numpy_inputs(rng):
    p = rng.dirichlet(np.ones(4), size=(3, 2))
    w = np.array([0.2, 0.3, 0.5])
    for t in (fuse_targets(p, w), leave_one_out_targets(p, w), leave_one_out_targets(p),
              fuse_logits(np.log(p), w)):
        assert t.dtype == jnp.float32
