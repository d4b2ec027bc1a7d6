"""Mixed precision: params float32, compute bfloat16, and everything after the logits float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtkd_jax as mk
from mtkd_jax.core import precision
from mtkd_jax.models.zoo import nnx as nm

D, C, B, K = 40, 10, 64, 3
BF16 = jnp.bfloat16


def test_losses_softmaxes_and_targets_of_bfloat16_inputs_are_float32(rng):
    s = jnp.asarray(rng.normal(size=(B, C)), BF16)
    z = jnp.asarray(rng.normal(size=(K, B, C)), BF16)
    y = jnp.asarray(rng.integers(0, C, size=B), jnp.int32)
    t = mk.softmax_t(z, temperature=4.0)
    assert t.dtype == jnp.float32 and mk.core.divergence.log_softmax_t(z).dtype == jnp.float32
    tb = t[0].astype(BF16)
    assert mk.soft_kl(s, tb, temperature=4.0).dtype == jnp.float32
    assert mk.soft_mse(s, tb).dtype == jnp.float32
    assert mk.cross_entropy(s, y).dtype == jnp.float32
    assert mk.distillation_loss(s, tb, y, alpha=0.5).dtype == jnp.float32
    for name in ("uniform", "confidence", "entropy", "agreement"):
        dt = mk.distill_targets(z, y, temperature=2.0, weighting=name)
        assert dt.targets.dtype == dt.weights.dtype == jnp.float32, name
    # The float32 value of a bfloat16 input, not a bfloat16 rounding of it.
    want = mk.soft_kl(s.astype(jnp.float32), tb.astype(jnp.float32), temperature=4.0)
    np.testing.assert_array_equal(mk.soft_kl(s, tb, temperature=4.0), want)


def test_policy_casts():
    tree = {"w": jnp.ones(2), "i": jnp.arange(2), "k": jax.random.key(0)}
    out = precision.MIXED_BFLOAT16.cast_to_compute(tree)
    assert out["w"].dtype == BF16 and out["i"].dtype == jnp.int32
    assert precision.get_policy("bfloat16").params_dtype == BF16
    assert precision.get_policy(None) is None
    with pytest.raises(ValueError, match="one of"):
        precision.get_policy("fp8")
    with pytest.raises(TypeError, match="floating dtype"):
        precision.get_policy(precision.Policy(jnp.int32))


def _setup(policy, teacher_policy):
    teachers = [nm.CNN1D(D, C, features=(16, 16), hidden=32, rngs=nnx.Rngs(i)) for i in range(K)]
    t_model, t_params, t_state = mk.nnx_split(teachers, policy=teacher_policy)
    student = nm.MLP(D, C, features=(64,), batch_norm=True, dropout=0.1, rngs=nnx.Rngs(9))
    model, params, model_state = mk.nnx_split(student, policy=policy)
    tx = optax.adam(3e-3)
    step = jax.jit(mk.make_distill_step(
        model, mk.make_stacked_apply(t_model, runner="loop"), tx,
        weighting="confidence", temperature=4.0, alpha=0.5,
    ))
    state = mk.init_train_state(params, tx, model_state=model_state)
    return step, state, mk.models.model_variables(t_params, t_state)


def test_bfloat16_distill_step_within_1e2_of_float32(rng):
    """Compute bf16 with params f32 (student) and bf16 teachers: the losses of 10 steps stay
    within 1e-2 relative of the float32 run's, and are float32."""
    batches = [
        {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
         "y": jnp.asarray(rng.integers(0, C, size=B), jnp.int32)}
        for _ in range(10)
    ]
    runs = {}
    for name, policy, teacher_policy in (
        ("float32", "float32", "float32"),
        ("bfloat16", "mixed_bfloat16", "bfloat16"),
    ):
        step, state, tp = _setup(policy, teacher_policy)
        losses = []
        for batch in batches:
            state, m = step(state, batch, jax.random.key(0), teacher_params=tp)
            assert m["loss"].dtype == m["soft_loss"].dtype == jnp.float32
            assert m["teacher_weights"].dtype == jnp.float32
            losses.append(float(m["loss"]))
        runs[name] = (np.asarray(losses), state, tp)
    f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
    gap = np.abs(bf16 - f32) / np.abs(f32)
    assert gap.max() < 1e-2, gap
    state, tp = runs["bfloat16"][1], runs["bfloat16"][2]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.model_state))
    assert all(leaf.dtype == BF16 for leaf in jax.tree.leaves(tp["params"]))


def test_linen_model_under_a_policy_computes_in_bfloat16():
    model = mk.linen_model(mk.models.MLP(num_classes=C, features=(8,), batch_norm=True),
                           policy="mixed_bfloat16")
    params, model_state = model.init(jax.random.key(0), jnp.zeros((1, D)))
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    x = jnp.ones((4, D))
    jaxpr = str(jax.make_jaxpr(lambda p: model(p, model_state, x, train=True, key=None))(params))
    assert "bf16" in jaxpr
    logits, new_state = model(params, model_state, x, train=True)
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_state))
    plain = mk.as_model(lambda w, x: x @ w, policy="bfloat16")
    assert plain(jnp.ones((D, C)), None, x, train=False)[0].dtype == jnp.float32


def _kl_reference(s, z, temperature):
    """float64 NumPy: mean over tokens of T^2 KL(mean_k softmax(z_k / T) || softmax(s / T)),
    and its gradient with respect to the student logits s."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    t = softmax(z / temperature).mean(0)
    log_q = s / temperature - s.max(-1, keepdims=True) / temperature
    log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
    n = s.shape[0] * s.shape[1]
    kl = (t * (np.log(t) - log_q)).sum(-1)
    grad = temperature * (np.exp(log_q) - t) / n
    return temperature**2 * kl.mean(), grad


def test_chunked_soft_loss_of_bfloat16_logits_at_a_large_vocabulary_is_float32_accurate(rng):
    # V = 128k, bfloat16 student and teacher logits (what bfloat16 models hand the loss): the
    # chunked loss accumulates in float32, so it is within 1e-4 of a float64 reference and
    # its gradient within 1e-3 (a bfloat16 accumulation over V is off by ~1e-2).
    from mtkd_jax.objective.loss import chunked_distill_sums, finish_distill

    v, b, length, k, temperature = 131072, 1, 6, 2, 2.0
    s = jnp.asarray(3.0 * rng.normal(size=(b, length, v)), BF16)
    z = jnp.asarray(3.0 * rng.normal(size=(k, b, length, v)), BF16)
    want, want_grad = _kl_reference(np.asarray(s, np.float64), np.asarray(z, np.float64),
                                    temperature)

    def soft(logits):
        sums = chunked_distill_sums(logits, lambda _, f: f, None, z, chunk_size=4,
                                    temperature=temperature)
        return finish_distill(sums)[0].soft

    got = jax.jit(soft)(s)
    assert got.dtype == jnp.float32
    assert abs(float(got) - want) <= 1e-4 * abs(want)
    # The gradient in float32 (with respect to float32 logits holding the bfloat16 values; a
    # gradient with respect to a bfloat16 array is itself rounded to bfloat16).
    grad = np.asarray(jax.jit(jax.grad(soft))(s.astype(jnp.float32)), np.float64)
    err = np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad)
    assert err <= 1e-3, err
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-3 * np.abs(want_grad).max())
