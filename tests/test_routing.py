"""Tests for the label-free routing strategies (mtkd_jax.weighting.routing): near one-hot weights
on inputs only one teacher knows (synthetic logits of disjoint teachers), where confidence and
entropy cannot exceed 1/(K-1); the fits (`fit_temperature`, `fit_gate`) against float64 NumPy
references; bad input. The float64 references of the strategies themselves and the registry's
property tests are in tests/test_weighting.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtkd_jax import weighting
from mtkd_jax.core import class_sets
from mtkd_jax.objective.targets import distill_targets

C, K, B = 9, 3, 60
GROUPS = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
KNOWN = class_sets.known_mask(GROUPS, num_classes=C)


def synthetic(rng, b=B, margin=8.0):
    """Disjoint teachers: the teacher that knows the input's class is sure of it (logit
    `margin` on it), the others see an unfamiliar input (small, flat logits)."""
    y = rng.integers(0, C, size=b)
    owner = y // 3
    local = []
    for k, g in enumerate(GROUPS):
        z = rng.normal(scale=0.3, size=(b, len(g)))
        mine = owner == k
        z[mine, y[mine] - g[0]] += margin
        local.append(z.astype(np.float32))
    return class_sets.to_global_logits(local, GROUPS, num_classes=C), y, owner


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("name, hyper", [
    ("energy", {}),
    ("max_logit", {}),
    ("calibrated", {"sharpness": 8.0}),
    ("gate", {"scale": np.full(K, 2.0, np.float32), "bias": np.zeros(K, np.float32)}),
])
def test_routing_is_near_one_hot_on_inputs_only_one_teacher_knows(rng, name, hyper):
    z, y, owner = synthetic(rng)
    fn = weighting.get_weighting(name, **hyper)
    w = np.asarray(jax.jit(lambda z: fn(jax.nn.softmax(z), logits=z))(z))
    assert w.shape == (K, B)
    np.testing.assert_array_equal(np.argmax(w, 0), owner)
    assert np.min(w[owner, np.arange(B)]) > 0.95, name
    # The fused target is (nearly) the owner's renormalised distribution: the label's argmax.
    t = distill_targets(z, weighting=fn, known=KNOWN).targets
    np.testing.assert_array_equal(np.argmax(t, -1), y)


def test_confidence_and_entropy_cannot_route(rng):
    z, _, owner = synthetic(rng)
    for name in ("entropy", "confidence"):
        w = np.asarray(weighting.get_weighting(name)(jax.nn.softmax(z), logits=z))
        assert np.max(w) <= 1 / (K - 1) + 1e-6, name


def test_fit_temperature_matches_a_float64_grid_search(rng):
    n = 200
    z = rng.normal(scale=3.0, size=(n, 5))
    y = np.where(rng.random(n) < 0.7, np.argmax(z, -1), rng.integers(0, 5, size=n))
    t = weighting.fit_temperature(z.astype(np.float32), y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
    nll = [-np.mean(np.take_along_axis(np_log_softmax(z / g), y[:, None], 1)) for g in grid]
    np.testing.assert_allclose(t, grid[int(np.argmin(nll))], rtol=5e-3)


def test_fit_temperature_with_known_classes(rng):
    z, y, owner = synthetic(rng, b=120, margin=2.0)
    mine = owner == 1
    t_masked = weighting.fit_temperature(np.asarray(z[1])[mine], y[mine])
    local = np.asarray(z[1])[mine][:, GROUPS[1]]
    t_local = weighting.fit_temperature(local, y[mine] - 3)
    t_known = weighting.fit_temperature(np.asarray(z[1])[mine] + 0.0, y[mine],
                                        known=KNOWN[1])
    np.testing.assert_allclose([t_masked, t_known], t_local, rtol=1e-6)


def test_fit_gate_maximises_the_mixture_likelihood(rng):
    z, y, _ = synthetic(rng, b=200, margin=3.0)
    z = np.asarray(z) * np.array([1.0, 2.0, 0.5], np.float32)[:, None, None]  # unequal scales

    def np_mixture_nll(scale, bias):
        zz = np.asarray(z, np.float64)
        e = np.log(np.exp(zz).sum(-1))  # [K, N]
        g = np.asarray(scale, np.float64)[:, None] * e + np.asarray(bias, np.float64)[:, None]
        logw = g - np.log(np.exp(g - g.max(0)).sum(0)) - g.max(0)
        logp = np.take_along_axis(np_log_softmax(zz), y[None, :, None], -1)[..., 0]
        s = logw + logp
        m = s.max(0)
        return -np.mean(m + np.log(np.exp(s - m).sum(0)))

    fitted = weighting.fit_gate(z, y.astype(np.int32), steps=200)
    assert np_mixture_nll(**fitted) < np_mixture_nll(np.ones(K), np.zeros(K)) - 0.05
    w = weighting.get_weighting("gate", **fitted)(jax.nn.softmax(z), logits=jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(w).sum(0), 1.0, rtol=1e-5)


def test_temperatures_divide_the_logits_of_each_teacher(rng):
    z = rng.normal(size=(K, 4, C)).astype(np.float32)
    tau = np.array([0.5, 1.0, 4.0], np.float32)
    for name in ("energy", "max_logit", "calibrated"):
        a = weighting.get_weighting(name, temperatures=tau)(z, logits=z)
        b = weighting.get_weighting(name)(z, logits=z / tau[:, None, None])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_routing_bad_input():
    p = np.full((K, 2, C), 1 / C, np.float32)
    for name in ("energy", "max_logit", "calibrated"):
        with pytest.raises(ValueError, match=f"weighting '{name}' needs `logits`"):
            weighting.get_weighting(name)(p)
        with pytest.raises(ValueError, match=r"`temperatures` must have shape \[K\]=\(3,\)"):
            weighting.get_weighting(name, temperatures=np.ones(2))(p, logits=p)
        with pytest.raises(ValueError, match=r"`temperatures` must be a finite number > 0"):
            weighting.get_weighting(name, temperatures=np.array([1.0, 0.0, 1.0]))(p, logits=p)
        with pytest.raises(ValueError, match=r"`sharpness` must be >= 0"):
            weighting.get_weighting(name, sharpness=-1.0)(p, logits=p)
    with pytest.raises(ValueError, match=r"`scale` must have shape \[K\]=\(3,\)"):
        weighting.gate(p, logits=p, scale=np.ones(2), bias=np.zeros(3))
    with pytest.raises(ValueError, match=r"`logits` must have shape \[N, C\]"):
        weighting.fit_temperature(np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, 3\)"):
        weighting.fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"`labels` hold classes the teacher does not know"):
        weighting.fit_temperature(np.zeros((2, 3)), np.array([0, 2]), known=[1, 1, 0])
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\)"):
        weighting.fit_gate(np.zeros((K, 4, C), np.float32), np.zeros(3, np.int32))


def np_gate_features(z):
    """float64 reference of `gate_features`: [max z, max log p, p, others' mean p]."""
    z = np.asarray(z, np.float64)
    logp = np_log_softmax(z)
    p = np.exp(logp)
    others = (p.sum(0, keepdims=True) - p) / (z.shape[0] - 1)
    return np.concatenate([z.max(-1, keepdims=True), logp.max(-1, keepdims=True), p, others],
                          -1)


def test_gate_with_coefficients_matches_numpy_and_permutes_with_the_teachers(rng):
    z = rng.normal(scale=2.0, size=(K, 5, C)).astype(np.float32)
    scale, bias = rng.normal(size=K), rng.normal(size=K)
    theta = rng.normal(size=(K, 2 + 2 * C))
    np.testing.assert_allclose(weighting.gate_features(z), np_gate_features(z), rtol=1e-5,
                               atol=1e-6)
    e = np.log(np.exp(np.asarray(z, np.float64)).sum(-1))
    g = scale[:, None] * e + bias[:, None] + np.einsum("knf,kf->kn", np_gate_features(z), theta)
    ref = np.exp(g - g.max(0)) / np.exp(g - g.max(0)).sum(0)
    fn = weighting.get_weighting("gate", scale=scale, bias=bias, coefficients=theta)
    w = np.asarray(jax.jit(lambda z: fn(z, logits=z))(z))
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)
    perm = np.array([2, 0, 1])
    w_perm = weighting.gate(z[perm], logits=z[perm], scale=scale[perm], bias=bias[perm],
                            coefficients=theta[perm])
    np.testing.assert_allclose(w_perm, w[perm], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`coefficients` must have shape \[K, 2 \+ 2C\]"):
        weighting.gate(z, logits=z, scale=scale, bias=bias, coefficients=theta[:, :3])


def test_fit_gate_with_features_routes_where_the_energy_cannot(rng):
    """Teachers as sure on unfamiliar inputs as on their own (equal energies), but on a
    default class of their group: the probabilities tell the owner, the energies cannot."""
    y = rng.integers(0, C, size=300)
    owner = y // 3
    z = rng.normal(scale=0.3, size=(K, 300, C)).astype(np.float32)
    for k in range(K):  # the owner is sure of the class, the others of their first class
        guess = np.where(owner == k, y, GROUPS[k][0])
        z[k, np.arange(300), guess] += 3.0
    z = np.asarray(class_sets.mask_unknown(z, KNOWN))
    plain = weighting.fit_gate(z, y.astype(np.int32), steps=300)
    rich = weighting.fit_gate(z, y.astype(np.int32), features=True, steps=300)
    acc = {}
    for name, fitted in (("plain", plain), ("rich", rich)):
        w = weighting.get_weighting("gate", **fitted)(z, logits=z)
        acc[name] = np.mean(np.argmax(np.asarray(w), 0) == owner)
    assert acc["rich"] > 0.8 and acc["rich"] > acc["plain"] + 0.2, acc


def np_gate_inputs(z):
    """float64 reference of `gate_inputs`: per teacher [logsumexp z, max z, max(log p, -30)],
    teachers side by side."""
    z = np.asarray(z, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(
        -1, keepdims=True)
    f = np.concatenate([lse, z.max(-1, keepdims=True),
                        np.maximum(np_log_softmax(z), -30.0)], -1)
    return np.moveaxis(f, 0, -2).reshape(z.shape[1], -1)


def test_gate_with_a_hidden_layer_matches_numpy(rng):
    z = rng.normal(scale=3.0, size=(K, 6, C)).astype(np.float32)
    z[1, :, 0] = -80.0  # a log-probability under the floor
    h = 5
    mlp = {"w1": rng.normal(size=(K * (C + 2), h)), "b1": rng.normal(size=h),
           "w2": rng.normal(size=(h, K)), "b2": rng.normal(size=K)}
    scale, bias = rng.normal(size=K), rng.normal(size=K)
    u = np_gate_inputs(z)
    assert u[:, C + 2 + 2].min() == -30.0  # teacher 1's class 0 sits at the floor
    np.testing.assert_allclose(weighting.gate_inputs(z), u, rtol=1e-5, atol=1e-5)
    e = np.log(np.exp(np.asarray(z, np.float64)).sum(-1))
    g = (scale[:, None] * e + bias[:, None]
         + (np.tanh(u @ mlp["w1"] + mlp["b1"]) @ mlp["w2"] + mlp["b2"]).T)
    ref = np.exp(g - g.max(0)) / np.exp(g - g.max(0)).sum(0)
    fn = weighting.get_weighting("gate", scale=scale, bias=bias, mlp=mlp)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda z: fn(z, logits=z))(z)), ref,
                               rtol=1e-4, atol=1e-6)
    zero_out = {**mlp, "w2": np.zeros((h, K)), "b2": np.zeros(K)}
    np.testing.assert_allclose(weighting.gate(z, logits=z, scale=scale, bias=bias, mlp=zero_out),
                               weighting.gate(z, logits=z, scale=scale, bias=bias), rtol=1e-6)
    with pytest.raises(ValueError, match=r"`mlp\['w1'\]` must have shape \(33, 5\)"):
        weighting.gate(z, logits=z, scale=scale, bias=bias, mlp={**mlp, "w1": mlp["w1"][1:]})
    with pytest.raises(ValueError, match=r"`mlp` must be a dict with keys"):
        weighting.gate(z, logits=z, scale=scale, bias=bias, mlp={"w1": mlp["w1"]})


def test_fit_gate_with_a_hidden_layer_routes_where_a_linear_gate_cannot(rng):
    """Every teacher is equally sure of one of two classes of its group; which of teachers
    0 and 1 owns the input is the XOR of their two choices (teacher 2 is noise). A gate
    linear in the teachers' outputs gets at most 3/4 of that right; one hidden layer over
    all of them can route it."""
    n = 600
    choice = rng.integers(0, 2, size=(K, n))  # each teacher's class: the first two of its group
    owner = ((choice[0] == 0) ^ (choice[1] == 0)).astype(int)
    y = np.array(GROUPS)[owner, choice[owner, np.arange(n)]]
    z = rng.normal(scale=0.3, size=(K, n, C)).astype(np.float32)
    for k in range(K):
        z[k, np.arange(n), np.array(GROUPS[k])[choice[k]]] += 4.0
    z = np.asarray(class_sets.mask_unknown(z, KNOWN))
    train, test = slice(0, 400), slice(400, n)
    acc = {}
    for name, kw in (("linear", {"features": True, "steps": 2000, "learning_rate": 3e-3}),
                     ("hidden", {"features": True, "hidden": 16, "key": jax.random.key(0)})):
        fitted = weighting.fit_gate(z[:, train], y[train].astype(np.int32), **kw)
        w = np.asarray(weighting.get_weighting("gate", **fitted)(z[:, test], logits=z[:, test]))
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5)
        acc[name] = np.mean(np.argmax(w, 0) == owner[test])
    assert acc["hidden"] > 0.95 and acc["linear"] < 0.85, acc
    with pytest.raises(ValueError, match=r"`key` \(a PRNG key"):
        weighting.fit_gate(z, y.astype(np.int32), hidden=4)
