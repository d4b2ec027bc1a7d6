"""Tests for mtkd_jax.core.losses: soft_mse, soft_kl, cross_entropy, distillation_loss,
per_teacher_soft_kl against float64 NumPy references, jitted and batched, with gradients,
properties and bad input."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHAPE, TOL, assert_matches, np_log_softmax, random_logits, random_probs
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from mtkd_jax import fuse_targets
from mtkd_jax.core import losses
from mtkd_jax.core.losses import (
    cross_entropy,
    distillation_loss,
    per_teacher_soft_kl,
    soft_kl,
    soft_mse,
)
from mtkd_jax.objective import loss as objective_loss


# ---------------------------------------------------------------- float64 NumPy references
def np_soft_mse(s, t, temperature=1.0):
    return np.sum((np.exp(np_log_softmax(s, temperature)) - np.asarray(t, np.float64)) ** 2, -1)


def np_soft_kl(s, t, temperature=1.0):
    t = np.asarray(t, np.float64)
    log_t = np.log(np.where(t > 0, t, 1.0))
    kl = np.sum(np.where(t > 0, t * (log_t - np_log_softmax(s, temperature)), 0.0), -1)
    return temperature**2 * kl


def np_cross_entropy(z, y):
    return -np.take_along_axis(np_log_softmax(z), np.asarray(y)[..., None], -1)[..., 0]


def np_distillation(s, t, y, alpha, temperature, soft_loss):
    soft = {"kl": np_soft_kl, "mse": np_soft_mse}[soft_loss](s, t, temperature)
    return soft if y is None else alpha * np_cross_entropy(s, y) + (1 - alpha) * soft


def np_per_teacher(s, p, w, temperature):
    w = np.asarray(w, np.float64)
    w = w.reshape(w.shape + (1,) * (p.ndim - 1 - w.ndim))
    return np.sum(w * np.stack([np_soft_kl(s, pk, temperature) for pk in p]), axis=0)


# ---------------------------------------------------------------- values: eager, jit, batched
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_losses_match_reference(rng, temperature):
    shape = SHAPE[1:]  # [B1, B2, C]
    s, t = random_logits(rng, shape), random_probs(rng, shape)
    t[0, 0] = [0.0, 0.0, 1.0, 0.0, 0.0]  # exact zeros in the target
    for fn, ref in ((soft_kl, np_soft_kl), (soft_mse, np_soft_mse)):
        f = lambda s, t, temp, fn=fn: fn(s, t, temperature=temp)
        assert_matches(f, (s, t, temperature), ref(s, t, temperature))


def test_soft_losses_accept_traced_temperature(rng):
    s, t = random_logits(rng, (4, 5)), random_probs(rng, (4, 5))
    f = jax.jit(lambda s, t, temp: (soft_kl(s, t, temperature=temp),
                                    soft_mse(s, t, temperature=temp)))
    kl, mse = f(s, t, jnp.float32(3.0))
    np.testing.assert_allclose(kl, np_soft_kl(s, t, 3.0), **TOL)
    np.testing.assert_allclose(mse, np_soft_mse(s, t, 3.0), **TOL)


def test_cross_entropy_matches_reference(rng):
    z = random_logits(rng, SHAPE[1:])
    y = rng.integers(0, 5, size=SHAPE[1:-1]).astype(np.int32)
    assert_matches(cross_entropy, (z, y), np_cross_entropy(z, y))


def test_cross_entropy_derivatives_match_reference(rng):
    # The gradient g (softmax(z) - onehot(y)) against float64, and forward mode (its rule is
    # a custom JVP): a Hessian-vector product against the float64 (diag(p) - p p^T) v.
    z = random_logits(rng, (4, 3, 7))
    y = rng.integers(0, 7, size=(4, 3)).astype(np.int32)
    w = rng.standard_normal((4, 3))
    p = np.exp(np_log_softmax(z))
    onehot = np.eye(7)[y]
    loss = lambda z: jnp.sum(jnp.asarray(w, jnp.float32) * cross_entropy(z, y))  # noqa: E731
    grad = jax.jit(jax.grad(loss))(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(grad, w[..., None] * (p - onehot), rtol=1e-5, atol=1e-6)
    v = rng.standard_normal(z.shape)
    _, hv = jax.jvp(jax.grad(loss), (jnp.asarray(z, jnp.float32),), (jnp.asarray(v, jnp.float32),))
    want = w[..., None] * (p * v - p * np.sum(p * v, -1, keepdims=True))
    np.testing.assert_allclose(hv, want, rtol=1e-4, atol=1e-5)
    # vmap of the gradient over a leading axis = the whole batch.
    per = jax.vmap(jax.grad(lambda z, y: jnp.sum(cross_entropy(z, y))))(
        jnp.asarray(z, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(per, p - onehot, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights_shape", [(3,), (3, 2, 4)], ids=["per-teacher", "per-example"])
def test_per_teacher_soft_kl_matches_reference(rng, weights_shape):
    s, p = random_logits(rng, SHAPE[1:]), random_probs(rng, SHAPE)
    w = np.moveaxis(rng.dirichlet(np.ones(3), size=weights_shape[1:]), -1, 0).astype(np.float32)
    f = lambda s, p, w: per_teacher_soft_kl(s, p, w, temperature=2.0)
    assert_matches(f, (s, p, w), np_per_teacher(s, p, w, 2.0))


@pytest.mark.parametrize("soft_loss", ["kl", "mse"])
def test_distillation_loss_matches_reference(rng, soft_loss):
    shape = SHAPE[1:]
    s, t = random_logits(rng, shape), random_probs(rng, shape)
    y = rng.integers(0, 5, size=shape[:-1]).astype(np.int32)
    for alpha in (0.0, 0.3, 1.0):
        f = lambda s, t, y, a: distillation_loss(s, t, y, alpha=a, temperature=3.0,
                                                 soft_loss=soft_loss)
        assert_matches(f, (s, t, y, alpha), np_distillation(s, t, y, alpha, 3.0, soft_loss))
    # alpha = 0 (the default) needs no labels; the soft loss is returned as is.
    np.testing.assert_allclose(distillation_loss(s, t, temperature=3.0, soft_loss=soft_loss),
                               losses.SOFT_LOSSES[soft_loss](s, t, temperature=3.0))


def test_distillation_loss_alpha_mixes_linearly(rng):
    s, t = random_logits(rng, (6, 5)), random_probs(rng, (6, 5))
    y = rng.integers(0, 5, size=6).astype(np.int32)
    hard, soft = cross_entropy(s, y), soft_kl(s, t, temperature=2.0)
    mix = jax.jit(lambda a: distillation_loss(s, t, y, alpha=a, temperature=2.0))
    np.testing.assert_allclose(mix(0.0), soft, **TOL)
    np.testing.assert_allclose(mix(1.0), hard, **TOL)
    np.testing.assert_allclose(mix(0.25), 0.25 * hard + 0.75 * soft, **TOL)


def test_soft_loss_registry():
    assert sorted(losses.SOFT_LOSSES) == ["kl", "mse"]
    assert losses.SOFT_LOSSES["kl"] is soft_kl and losses.SOFT_LOSSES["mse"] is soft_mse


# ---------------------------------------------------------------- gradients
def test_grads(rng):
    with jax.enable_x64(True):
        s = 2.0 * rng.standard_normal((2, 4))
        t = rng.dirichlet(np.ones(4), size=2)
        p = rng.dirichlet(np.ones(4), size=(3, 2))
        w = np.moveaxis(rng.dirichlet(np.ones(3), size=2), -1, 0)
        y = rng.integers(0, 4, size=2)
        r = rng.standard_normal((5, 2))

        def f(s, t, p, w, temp, alpha):
            return (jnp.sum(r[0] * soft_kl(s, t, temperature=temp))
                    + jnp.sum(r[1] * soft_mse(s, t, temperature=temp))
                    + jnp.sum(r[2] * cross_entropy(s, y))
                    + jnp.sum(r[3] * distillation_loss(s, t, y, alpha=alpha, temperature=temp))
                    + jnp.sum(r[4] * per_teacher_soft_kl(s, p, w, temperature=temp)))

        check_grads(jax.jit(f), (s, t, p, w, 2.0, 0.3), order=1, modes=["rev"], eps=1e-6)


def test_finite_grads_at_extreme_logits_and_zero_targets(rng):
    s = rng.choice([-50.0, 50.0], size=(3, 4, 5)).astype(np.float32)
    t = np.zeros((3, 4, 5), np.float32)
    t[..., 0] = 1.0  # one-hot targets: exact zeros elsewhere
    t[1] = jax.nn.softmax(rng.choice([-50.0, 50.0], size=(4, 5)))  # underflows to zeros
    p = np.stack([t, t[::-1], np.roll(t, 1, axis=-1)])  # [K=3, 3, 4, 5] teachers, with zeros
    y = np.zeros((3, 4), np.int32)
    w = np.array([1.0, 0.0, 0.0], np.float32)

    def f(s, t, p, temp):
        return (jnp.sum(soft_kl(s, t, temperature=temp)) + jnp.sum(soft_mse(s, t))
                + jnp.sum(cross_entropy(s, y))
                + jnp.sum(distillation_loss(s, t, y, alpha=0.5, temperature=temp))
                + jnp.sum(per_teacher_soft_kl(s, p, w, temperature=temp)))

    for temp in (1.0, 0.5):
        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(s, t, p, temp)
        assert np.isfinite(value)
        assert all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- properties (hypothesis)
@st.composite
def logits_and_targets(draw):
    """Student logits `[3, 5]` (|z| up to 60) and targets with exact zeros allowed."""
    s = draw(hnp.arrays(np.float32, (3, 5), elements=st.floats(-60, 60, width=32)))
    raw = draw(hnp.arrays(np.float64, (3, 5), elements=st.floats(0, 1, allow_subnormal=False)))
    raw[..., 0] += raw.sum(-1) == 0
    return s, (raw / raw.sum(-1, keepdims=True)).astype(np.float32)


_kl_and_self = jax.jit(lambda s, t, temp: (soft_kl(s, t, temperature=temp),
                                           soft_kl(s, jax.nn.softmax(s / temp), temperature=temp),
                                           soft_mse(s, t, temperature=temp)))


@settings(max_examples=20)
@given(st_=logits_and_targets(), temp=st.sampled_from([1.0, 4.0]))
def test_property_kl_nonnegative_and_zero_at_own_prediction(st_, temp):
    s, t = st_
    kl, kl_self, mse = (np.asarray(x) for x in _kl_and_self(s, t, temp))
    assert np.all(np.isfinite(kl)) and np.all(kl >= -1e-5 * temp**2)
    np.testing.assert_allclose(kl_self, 0.0, atol=1e-5 * temp**2)
    assert np.all(mse >= 0) and np.all(mse <= 2.0 + 1e-6)


_single_vs_fused = jax.jit(
    lambda s, p, w, y, k: (
        distillation_loss(s, fuse_targets(p, w), y, alpha=0.3, temperature=2.0),
        distillation_loss(s, p[k], y, alpha=0.3, temperature=2.0),
        per_teacher_soft_kl(s, p, w, temperature=2.0),
        soft_kl(s, p[k], temperature=2.0),
    )
)


@settings(max_examples=15)
@given(st_=logits_and_targets(), k=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_property_one_hot_weights_equal_single_teacher_kd(st_, k, seed):
    s, _ = st_
    p = np.random.default_rng(seed).dirichlet(np.ones(5), size=(3, 3)).astype(np.float32)
    y = np.random.default_rng(seed).integers(0, 5, size=3).astype(np.int32)
    w = np.eye(3, dtype=np.float32)[k]
    fused, single, per_teacher, single_kl = _single_vs_fused(s, p, w, y, k)
    np.testing.assert_allclose(fused, single, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(per_teacher, single_kl, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bad input
S = np.zeros((2, 4), np.float32)
T = np.full((2, 4), 0.25, np.float32)


@pytest.mark.parametrize("fn", [soft_kl, soft_mse, distillation_loss])
def test_class_counts_must_match(fn):
    with pytest.raises(ValueError, match=r"`student_logits` has 4 classes.*`targets` has 3"):
        fn(S, np.full((2, 3), 1 / 3, np.float32))
    with pytest.raises(ValueError, match=r"`student_logits` \(2, 4\) and `targets` \(3, 4\) "
                                         r"must have the same shape"):
        fn(S, np.full((3, 4), 0.25, np.float32))


@pytest.mark.parametrize("fn", [soft_kl, soft_mse, distillation_loss])
def test_integer_logits_and_bad_temperature(fn):
    with pytest.raises(TypeError, match=r"`student_logits` must be a floating-point array"):
        fn(S.astype(np.int32), T)
    with pytest.raises(TypeError, match=r"`targets` must be a floating-point array"):
        fn(S, T.astype(np.int32))
    for temp in (0.0, -2.0):
        with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
            fn(S, T, temperature=temp)


def test_cross_entropy_bad_input():
    with pytest.raises(TypeError, match=r"`logits` must be a floating-point array"):
        cross_entropy(S.astype(np.int32), np.zeros(2, np.int32))
    with pytest.raises(TypeError, match=r"`labels` must be integer class indices"):
        cross_entropy(S, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\).*got \(3,\)"):
        cross_entropy(S, np.zeros(3, np.int32))


def test_distillation_loss_bad_options():
    with pytest.raises(ValueError, match=r"`soft_loss` must be one of \['kl', 'mse'\], got 'l1'"):
        distillation_loss(S, T, soft_loss="l1")
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
            distillation_loss(S, T, np.zeros(2, np.int32), alpha=alpha)
    with pytest.raises(ValueError, match=r"`alpha` > 0 .* needs labels"):
        distillation_loss(S, T, alpha=0.5)
    with pytest.raises(ValueError, match=r"`alpha` > 0 .* needs labels"):
        jax.jit(lambda a: distillation_loss(S, T, alpha=a))(0.0)  # traced: cannot tell it is 0


def test_per_teacher_soft_kl_bad_input():
    p, w = np.full((3, 2, 4), 0.25, np.float32), np.full(3, 1 / 3, np.float32)
    with pytest.raises(ValueError, match=r"`student_logits` has 5 classes.*`teacher_probs` has 4"):
        per_teacher_soft_kl(np.zeros((2, 5), np.float32), p, w)
    with pytest.raises(ValueError,
                       match=r"`student_logits` must have shape \[\.\.\., C\]=\(2, 4\)"):
        per_teacher_soft_kl(np.zeros((3, 4), np.float32), p, w)
    with pytest.raises(ValueError, match=r"`weights` must have 3 teachers.*`teacher_probs`"):
        per_teacher_soft_kl(S, p, np.full(2, 0.5, np.float32))
    with pytest.raises(TypeError, match=r"`student_logits` must be a floating-point array"):
        per_teacher_soft_kl(S.astype(np.int32), p, w)


def test_accepts_float64_numpy_inputs(rng):
    s, t = rng.standard_normal((2, 4)), rng.dirichlet(np.ones(4), size=2)
    p, y = rng.dirichlet(np.ones(4), size=(3, 2)), rng.integers(0, 4, size=2)
    outs = (soft_kl(s, t), soft_mse(s, t), cross_entropy(s, y),
            distillation_loss(s, t, y, alpha=0.5), per_teacher_soft_kl(s, p, np.ones(3) / 3))
    assert all(o.dtype == jnp.float32 and o.shape == (2,) for o in outs)


# ---------------------------------------------------------------- masked batch means
def test_mean_distillation_loss_matches_reference_with_a_ragged_label_mask(rng):
    b, c = 12, 5
    s = rng.normal(size=(b, c)).astype(np.float32)
    t = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
    y = rng.integers(0, c, size=b).astype(np.int32)
    mask = (rng.random(b) < 0.4).astype(np.float32)
    mask[0] = 1.0
    y_bad = np.where(mask > 0, y, -7).astype(np.int32)  # placeholders where unlabeled
    for soft_loss in ("kl", "mse"):
        got = jax.jit(lambda s, t, y, m, sl=soft_loss: objective_loss.mean_distillation_loss(
            s, t, y, alpha=0.3, temperature=2.0, soft_loss=sl, label_mask=m))(s, t, y_bad, mask)
        soft = np_distillation(s, t, y, 0.0, 2.0, soft_loss).mean()
        hard = (mask * np_cross_entropy(s, y)).sum() / mask.sum()
        np.testing.assert_allclose(got.soft, soft, rtol=1e-5)
        np.testing.assert_allclose(got.hard, hard, rtol=1e-5)
        np.testing.assert_allclose(got.loss, 0.7 * soft + 0.3 * hard, rtol=1e-5)
    # The per-example form with the mask: its mean weights the CE by the labeled fraction.
    per = losses.distillation_loss(s, t, y_bad, alpha=0.3, temperature=2.0, label_mask=mask)
    want = 0.7 * np_soft_kl(s, t, 2.0) + 0.3 * mask * np_cross_entropy(s, y)
    np.testing.assert_allclose(per, want, rtol=1e-5, atol=1e-6)
    # Gradients flow into the student only: the targets are held fixed.
    g = jax.grad(lambda t: objective_loss.mean_distillation_loss(s, t, y, alpha=0.3).loss)(t)
    np.testing.assert_array_equal(g, 0.0)


def test_mix_losses_and_mean_cross_entropy():
    assert float(losses.mix_losses(jnp.float32(2.0), jnp.float32(4.0), alpha=0.25)) == 2.5
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        losses.mix_losses(1.0, 1.0, alpha=1.5)
    z = np.array([[0.0, 0.0], [9.0, -9.0]], np.float32)
    np.testing.assert_allclose(
        objective_loss.mean_cross_entropy(z, np.array([0, 1]), label_mask=np.zeros(2)), 0.0)
    with pytest.raises(ValueError, match=r"`alpha` > 0 .* needs labels"):
        objective_loss.mean_distillation_loss(z, np.full((2, 2), 0.5, np.float32), alpha=0.5)


def test_soft_kl_no_mass_and_nan_targets():
    s = np.zeros((1, 3), np.float32)
    # A rounding-level negative target (a fused target of XLA-rounded weights) carries no mass.
    t = np.array([[0.5, 0.5, -1e-15]], np.float32)
    np.testing.assert_allclose(losses.soft_kl(s, t), losses.soft_kl(s, np.array([[0.5, 0.5, 0.0]],
                                                                                 np.float32)))
    assert np.isnan(losses.soft_kl(s, np.array([[0.5, np.nan, 0.5]], np.float32))[0])
