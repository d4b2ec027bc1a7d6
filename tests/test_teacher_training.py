"""Training teachers (`mtkd_jax.teachers._training`): K at once, or one after another.

Moved unchanged from tests/test_teachers.py with the code they test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax.models import MLP, SmallConvNet, apply_fn_of, init_params
from mtkd_jax.teachers import (
    init_ensemble,
    init_teacher_state,
    make_ensemble_train_step,
    make_heterogeneous_apply,
    make_teacher_train_step,
    set_hyperparams,
    unstack_params,
)

K = 3


def _rbg(seed):
    # rbg keys compile several times faster than threefry on a CPU (see `init_params`).
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def conv_setup():
    model = SmallConvNet(num_classes=5, widths=(4, 8))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
    # As in tests/test_teachers.py, less the stacked params, which no test here needs.
    return apply_fn_of(model), x, [init_params(model, _rbg(0), x[:1])], None


def _batches(rng, n, b=8, d=12, c=5):
    out = []
    for i in range(n):
        batch = {
            "x": jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, c, size=b), jnp.int32),
        }
        if i % 2:  # Every other batch has unlabeled examples.
            batch["label_mask"] = jnp.asarray(rng.integers(0, 2, size=b), jnp.float32)
        out.append(batch)
    return out


def _noise(x, key):
    return x + 0.1 * jax.random.normal(key, x.shape)


def test_vmapped_ensemble_training_equals_separate_runs(rng):
    model = MLP(num_classes=5, features=(16,))
    apply_fn = apply_fn_of(model)
    x0 = jnp.zeros((1, 12))
    lrs = np.array([0.1, 0.05, 0.2], np.float32)
    opt = lambda lr: optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9)
    # Threefry keys (the default): vmapped init equals unbatched init key by key.
    keys = jax.random.split(jax.random.key(0), K)
    init_fn = functools.partial(init_params, model, example_x=x0)
    state = init_ensemble(init_fn, keys, opt(0.1), hyperparams={"learning_rate": lrs})
    np.testing.assert_array_equal(state.opt_state.hyperparams["learning_rate"], lrs)
    np.testing.assert_array_equal(state.step, np.zeros(K))
    tx = opt(0.1)
    separate = [
        set_hyperparams(init_teacher_state(init_fn(keys[k]), tx), {"learning_rate": lrs[k]})
        for k in range(K)
    ]
    for k in range(K):
        jax.tree.map(
            np.testing.assert_array_equal, unstack_params(state.params)[k], separate[k].params
        )

    ens_step = make_ensemble_train_step(apply_fn, tx, augment_fn=_noise)
    single_step = make_teacher_train_step(apply_fn, tx, augment_fn=_noise)
    key = jax.random.key(42)
    for batch in _batches(rng, 4):
        state, metrics = ens_step(state, batch, key)
        assert metrics["loss"].shape == metrics["accuracy"].shape == (K,)
        for k in range(K):
            separate[k], m = single_step(separate[k], batch, jax.random.fold_in(key, k))
            np.testing.assert_allclose(metrics["loss"][k], m["loss"], rtol=1e-5)
            np.testing.assert_allclose(metrics["accuracy"][k], m["accuracy"], rtol=1e-6)
    np.testing.assert_array_equal(state.step, np.full(K, 4))
    for k in range(K):
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
            unstack_params(state.params)[k],
            separate[k].params,
        )
    # Different seeds and learning rates gave different teachers.
    w = state.params["Dense_0"]["kernel"]
    assert not np.allclose(w[0], w[1])


def test_train_step_loss_matches_numpy_with_label_mask(rng):
    # Linear model: the reported loss is the masked-mean CE of the pre-update params.
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    x = rng.normal(size=(6, 4))
    y = rng.integers(0, 3, size=6)
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    step = make_teacher_train_step(lambda w, x: x @ w, optax.sgd(0.1))
    batch = {
        "x": jnp.asarray(x, jnp.float32),
        "y": jnp.asarray(y, jnp.int32),
        "label_mask": jnp.asarray(mask),
    }
    _, m = step(init_teacher_state(w, optax.sgd(0.1)), batch, jax.random.key(0))
    z = x @ np.asarray(w, np.float64)
    logp = (
        z
        - np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1, keepdims=True))
        - z.max(1, keepdims=True)
    )
    ce = -logp[np.arange(6), y]
    np.testing.assert_allclose(m["loss"], np.sum(ce * mask) / mask.sum(), rtol=1e-5)
    acc = np.sum((z.argmax(1) == y) * mask) / mask.sum()
    np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)


def test_heterogeneous_teachers_train_one_after_another(rng, conv_setup):
    conv_apply, x_img, conv_params, _ = conv_setup
    mlp = MLP(num_classes=5, features=(8,))
    apply_fns = (apply_fn_of(mlp), conv_apply)
    params = (init_params(mlp, _rbg(3), x_img[:1]), conv_params[0])
    batch = {"x": x_img, "y": jnp.asarray(rng.integers(0, 5, size=x_img.shape[0]), jnp.int32)}
    tx = optax.adam(1e-2)
    trained = []
    for apply_fn, p in zip(apply_fns, params, strict=True):
        step = make_teacher_train_step(apply_fn, tx)
        state = init_teacher_state(p, tx)
        losses = []
        for _ in range(5):
            state, m = step(state, batch, jax.random.key(0))
            losses.append(float(m["loss"]))
        assert losses[-1] < losses[0]
        trained.append(state.params)
    logits = make_heterogeneous_apply(apply_fns)(tuple(trained), x_img)
    assert logits.shape == (2, x_img.shape[0], 5)


def test_hyperparam_and_state_errors():
    params = {"w": jnp.zeros((K, 2))}
    plain = init_ensemble(
        lambda key: {"w": jnp.zeros(2)}, jax.random.split(_rbg(0), K), optax.sgd(0.1)
    )
    with pytest.raises(ValueError, match="no injected hyperparameters"):
        set_hyperparams(plain, {"learning_rate": 0.1})
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    state = init_ensemble(lambda key: {"w": jnp.zeros(2)}, jax.random.split(_rbg(0), K), tx)
    with pytest.raises(ValueError, match=r"names \['lr'\], which the optimizer does not inject"):
        set_hyperparams(state, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"not broadcastable.*\(3,\)"):
        set_hyperparams(state, {"learning_rate": np.ones(2)})
    with pytest.raises(ValueError, match="`keys` must be a batch of K PRNG keys"):
        init_ensemble(lambda key: params, _rbg(0), tx)
    step = make_ensemble_train_step(lambda w, x: x @ w, tx)
    single = init_teacher_state({"w": jnp.zeros((2, 3))}, tx)
    with pytest.raises(ValueError, match=r"stacked TeacherState \(step of shape \[K\]\)"):
        step(single, {"x": jnp.ones((4, 2)), "y": jnp.zeros(4, jnp.int32)}, _rbg(0))
