"""Tests for mtkd_jax.core.class_sets and teachers with different class sets in targets and the
step:
float64 NumPy references, a full mask is today's behaviour exactly, disjoint teachers with
one-hot routing are single-teacher distillation on each class group, no NaN from -inf logits,
clear errors on bad class maps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax import pairwise_divergence, weighting
from mtkd_jax.core import class_sets
from mtkd_jax.objective.targets import distill_targets
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step

C = 7
MAPS = [[0, 1, 2], [3, 4], [5, 6]]  # disjoint groups
KNOWN = class_sets.known_mask(MAPS, num_classes=C)


def np_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_renormalised(z, known, t=1.0):
    """Teacher k's softmax over its known classes only, 0 elsewhere (float64)."""
    z = np.asarray(z, np.float64) / t
    out = np.zeros_like(z)
    for k in range(z.shape[0]):
        idx = np.flatnonzero(known[k])
        out[k][..., idx] = np_softmax(z[k][..., idx])
    return out


def local_logits(rng, b=5):
    return [rng.normal(size=(b, len(m))).astype(np.float32) * 2 for m in MAPS]


# ---------------------------------------------------------------- the global space
def test_to_global_logits_and_renormalised_probs_match_numpy(rng):
    loc = local_logits(rng)
    z = np.asarray(class_sets.to_global_logits(loc, MAPS, num_classes=C))
    assert z.shape == (3, 5, C)
    for k, m in enumerate(MAPS):
        np.testing.assert_array_equal(z[k][:, m], loc[k])
        assert np.all(z[k][:, ~KNOWN[k]] == class_sets.UNKNOWN_LOGIT)
    np.testing.assert_array_equal(np.asarray(class_sets.known_of(z))[:, 0], KNOWN)
    for t in (1.0, 3.0):
        p = class_sets.renormalised_probs(z, KNOWN, temperature=t)
        ref = np.zeros((3, 5, C))
        for k, m in enumerate(MAPS):
            ref[k][:, m] = np_softmax(np.asarray(loc[k], np.float64) / t)
        np.testing.assert_allclose(p, ref, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(p, np_renormalised(z, KNOWN, t), rtol=2e-6, atol=1e-7)


def test_distill_targets_with_known_matches_numpy(rng):
    """t = sum_k w_k p~_k, with uniform and with energy routing; -inf unknown logits too."""
    known = np.array([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]],
                     bool)  # overlapping sets
    z = rng.normal(size=(3, 4, C)).astype(np.float32) * 3
    z_inf = np.where(known[:, None], z, -np.inf).astype(np.float32)
    p = np_renormalised(z, known, 2.0)
    for name in ("uniform", "energy"):
        dt = jax.jit(lambda z, name=name: distill_targets(
            z, temperature=2.0, weighting=name, known=known))(z_inf)
        assert np.all(np.isfinite(dt.targets)) and np.all(np.isfinite(dt.weights))
        if name == "uniform":
            w = np.full((3, 4), 1 / 3)
        else:
            zm = np.where(known[:, None], z.astype(np.float64), -np.inf)
            lse = np.log(np.exp(zm).sum(-1))
            w = np_softmax(lse, axis=0)
        np.testing.assert_allclose(dt.weights, w, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(dt.probs, p, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(dt.targets, np.einsum("kb,kbc->bc", w, p), rtol=2e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(dt.targets).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["uniform", "confidence", "entropy", "agreement", "energy"])
def test_a_full_mask_is_todays_behaviour_exactly(rng, name):
    z = rng.normal(size=(3, 6, C)).astype(np.float32)
    y = rng.integers(0, C, size=6).astype(np.int32)
    full = np.ones((3, C), bool)
    a = distill_targets(z, y, temperature=2.0, weighting=name)
    b = distill_targets(z, y, temperature=2.0, weighting=name, known=full)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def _student(p, x):
    return x @ p


def _teachers(tp, x):  # K linear teachers in the global space
    return jnp.einsum("bd,kdc->kbc", x, tp)


def _run(step, params, tp, batch):
    tx = optax.sgd(0.5)
    state = init_train_state(params, tx)
    return jax.jit(step)(state, batch, jax.random.key(0), teacher_params=tp)


def test_full_mask_step_equals_todays_step(rng):
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, C, size=8).astype(np.int32)
    tp = rng.normal(size=(3, 4, C)).astype(np.float32)
    p0 = rng.normal(size=(4, C)).astype(np.float32) * 0.1
    tx = optax.sgd(0.5)
    out = []
    for known in (None, np.ones((3, C), bool)):
        step = make_distill_step(_student, _teachers, tx, weighting="confidence",
                                 temperature=2.0, known=known)
        out.append(_run(step, p0, tp, {"x": x, "y": y}))
    (s1, m1), (s2, m2) = out
    np.testing.assert_array_equal(s1.params, s2.params)
    for key in m1:
        np.testing.assert_array_equal(m1[key], m2[key], err_msg=key)


def _label_router(known):
    """One-hot routing by the true label: weight 1 on the teacher that knows y."""
    def route(probs, *, logits=None, labels=None, label_mask=None):
        return jnp.asarray(known, probs.dtype)[:, labels]
    return route


def test_disjoint_teachers_with_one_hot_routing_are_single_teacher_distillation(rng):
    """Each class group's batch: the K-teacher step = distilling from its one teacher alone."""
    tp = rng.normal(size=(3, 4, C)).astype(np.float32) * 2
    p0 = rng.normal(size=(4, C)).astype(np.float32) * 0.1
    tx = optax.sgd(0.5)
    multi = make_distill_step(_student, _teachers, tx, weighting=_label_router(KNOWN),
                              temperature=2.0, known=KNOWN)
    for g, m in enumerate(MAPS):
        x = rng.normal(size=(6, 4)).astype(np.float32)
        y = rng.choice(m, size=6).astype(np.int32)
        tp_inf = np.where(KNOWN[:, None], tp, -np.inf).astype(np.float32)  # -inf: no NaN
        s_multi, m_multi = _run(multi, p0, tp_inf, {"x": x, "y": y})
        single = make_distill_step(_student, _teachers, tx, temperature=2.0,
                                   known=KNOWN[g:g + 1])
        s_single, m_single = _run(single, p0, tp[g:g + 1], {"x": x, "y": y})
        np.testing.assert_allclose(s_multi.params, s_single.params, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m_multi["loss"], m_single["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_multi["teacher_weights"], np.eye(3)[g], atol=1e-7)
        assert float(m_multi["teacher_logits_finite"]) == 1.0
        # A disjoint pair shares no class: divergence 0, never NaN.
        np.testing.assert_array_equal(m_multi["teacher_divergence"], np.zeros((3, 3)))
        # The fused target is teacher g's distribution renormalised over group g.
        ref = np.zeros((6, C))
        ref[:, m] = np_softmax((x.astype(np.float64) @ tp[g].astype(np.float64))[:, m] / 2.0)
        dt = distill_targets(_teachers(tp_inf, x), y, temperature=2.0,
                             weighting=_label_router(KNOWN), known=KNOWN)
        np.testing.assert_allclose(dt.targets, ref, rtol=1e-5, atol=1e-6)


def test_minus_inf_logits_give_no_nan_for_any_strategy(rng):
    tp = rng.normal(size=(3, 4, C)).astype(np.float32)
    tp_inf = np.where(KNOWN[:, None], tp, -np.inf).astype(np.float32)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, C, size=8).astype(np.int32)
    mask = (np.arange(8) < 4).astype(np.float32)
    z = np.asarray(_teachers(tp_inf, x))
    for name in sorted(set(weighting.WEIGHTINGS) - {"static", "from_scores", "gate"}):
        dt = jax.jit(lambda z, y, m, name=name: distill_targets(
            z, y, label_mask=m, temperature=2.0, weighting=name, known=KNOWN))(z, y, mask)
        assert all(np.all(np.isfinite(a)) for a in dt), name
    step = make_distill_step(_student, _teachers, optax.sgd(0.5), weighting="confidence",
                             alpha=0.3, temperature=2.0, known=KNOWN, divergence_kind="kl")
    s, m = _run(step, np.zeros((4, C), np.float32), tp_inf, {"x": x, "y": y, "label_mask": mask})
    assert np.all(np.isfinite(s.params))
    assert all(np.all(np.isfinite(v)) for v in m.values())


# ---------------------------------------------------------------- divergences over shared classes
def test_pairwise_divergence_known_matches_numpy_and_full_mask(rng):
    known = np.array([[1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]],
                     bool)
    z = rng.normal(size=(3, 5, C)).astype(np.float32)
    p = np_renormalised(z, known)
    for kind in ("squared", "euclidean", "kl", "js"):
        full = class_sets.pairwise_divergence_known(p.astype(np.float32), np.ones((3, C), bool),
                                                    kind=kind)
        np.testing.assert_allclose(full, pairwise_divergence(p.astype(np.float32), kind=kind),
                                   rtol=1e-6, atol=1e-7)
    d = np.asarray(class_sets.pairwise_divergence_known(p.astype(np.float32), known))
    shared = known[0] & known[1]
    a = p[0][:, shared] / p[0][:, shared].sum(-1, keepdims=True)
    b = p[1][:, shared] / p[1][:, shared].sum(-1, keepdims=True)
    np.testing.assert_allclose(d[:, 0, 1], ((a - b) ** 2).sum(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(d[:, 0, 2], 0.0)  # no shared class
    np.testing.assert_array_equal(class_sets.shared_classes(known),
                                  known.astype(int) @ known.T.astype(int))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("maps, error, match", [
    ([[0, 7]], ValueError, r"`class_maps\[0\]` must hold classes in \[0, 7\); got \[7\]"),
    ([[0, 1], [-1]], ValueError, r"`class_maps\[1\]` must hold classes in \[0, 7\)"),
    ([[0, 2, 2]], ValueError, r"`class_maps\[0\]` must hold distinct classes; 2 appears"),
    ([[0.0, 1.0]], TypeError, r"`class_maps\[0\]` must hold integer class indices"),
    ([[]], ValueError, r"`class_maps\[0\]` must be a non-empty 1-D list"),
    ([], ValueError, r"`class_maps` must be a non-empty sequence"),
])
def test_bad_class_maps(maps, error, match):
    with pytest.raises(error, match=match):
        class_sets.known_mask(maps, num_classes=C)


def test_mismatched_teachers_and_classes(rng):
    z = rng.normal(size=(3, 2, C)).astype(np.float32)
    with pytest.raises(ValueError, match=r"`known` must have shape \[K, C\]=\(3, 7\)"):
        distill_targets(z, known=KNOWN[:2])
    with pytest.raises(ValueError, match=r"`known` must have shape \[K, C\]=\(3, 7\)"):
        distill_targets(z, known=KNOWN[:, :5])
    with pytest.raises(ValueError, match=r"teacher\(s\) \[1\] know no class"):
        distill_targets(z, known=np.array([KNOWN[0], np.zeros(C, bool), KNOWN[2]]))
    with pytest.raises(ValueError, match=r"`local_logits` holds 2 teachers but `class_maps` 3"):
        class_sets.to_global_logits(local_logits(rng)[:2], MAPS, num_classes=C)
    bad = local_logits(rng)
    bad[1] = bad[1][:, :1]
    with pytest.raises(ValueError, match=r"`local_logits\[1\]` has \(1,\) outputs but "
                                         r"`class_maps\[1\]` maps 2"):
        class_sets.to_global_logits(bad, MAPS, num_classes=C)
    step = make_distill_step(_student, _teachers, optax.sgd(0.1), known=KNOWN[:2])
    with pytest.raises(ValueError, match=r"`known` must have shape \[K, C\]=\(3, 7\)"):
        _run(step, np.zeros((4, C), np.float32), rng.normal(size=(3, 4, C)).astype(np.float32),
             {"x": np.ones((2, 4), np.float32)})


def test_routing_weights_know_nothing_of_unknown_classes():
    """The masked logits carry the known mask: energy ignores a teacher's unknown classes."""
    z = np.zeros((2, 1, 4), np.float32)
    known = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    w = distill_targets(z, weighting="energy", known=known).weights[:, 0]
    np.testing.assert_allclose(w, np_softmax(np.log([2.0, 4.0])), rtol=1e-6)
    assert weighting.energy(jnp.ones((2, 1, 4)) / 4, logits=z)[0, 0] == 0.5
