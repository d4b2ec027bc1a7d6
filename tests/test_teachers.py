"""Teacher ensembles: stacked and heterogeneous inference, ensemble training, save and load."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax import teachers
from mtkd_jax.checkpoint import params_fingerprint
from mtkd_jax.models import MLP, SmallConvNet, apply_fn_of, init_params
from mtkd_jax.teachers import (
    choose_strategy,
    init_ensemble,
    init_teacher_state,
    load_teachers,
    make_ensemble_train_step,
    make_heterogeneous_apply,
    make_stacked_apply,
    make_teacher_train_step,
    save_teachers,
    set_hyperparams,
    stack_params,
    teacher_fingerprint,
    unstack_params,
)

K = 3


def _rbg(seed):
    # rbg keys compile several times faster than threefry on a CPU (see `init_params`).
    return jax.random.key(seed, impl="rbg")


def _teachers(model, x, k=K):
    params = [init_params(model, _rbg(i), x[:1]) for i in range(k)]
    return params, stack_params(params)


@pytest.fixture(scope="module")
def mlp_setup():
    model = MLP(num_classes=5, features=(16,))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 12)), jnp.float32)
    return (apply_fn_of(model), x, *_teachers(model, x))


@pytest.fixture(scope="module")
def conv_setup():
    model = SmallConvNet(num_classes=5, widths=(4, 8))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
    return (apply_fn_of(model), x, *_teachers(model, x))


def test_stack_unstack_round_trip(mlp_setup):
    _, _, params_list, stacked = mlp_setup
    assert stacked["Dense_0"]["kernel"].shape == (K, 12, 16)
    for a, b in zip(unstack_params(stacked), params_list, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stack_params_errors():
    with pytest.raises(ValueError, match="`params_list` is empty"):
        stack_params([])
    with pytest.raises(TypeError, match="list or tuple"):
        stack_params({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"`params_list\[1\]` has a different pytree structure"):
        stack_params([{"w": jnp.zeros(2)}, {"v": jnp.zeros(2)}])
    with pytest.raises(ValueError, match=r"`params_list\[1\]` leaf 0 has shape \(3,\)"):
        stack_params([{"w": jnp.zeros(2)}, {"w": jnp.zeros(3)}])
    with pytest.raises(ValueError, match="disagree on the leading teacher axis K"):
        unstack_params({"a": jnp.zeros((2, 4)), "b": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match="is a scalar"):
        unstack_params({"a": jnp.zeros(())})


@pytest.mark.parametrize("setup", ["mlp_setup", "conv_setup"])
def test_strategies_give_the_same_logits(setup, request):
    apply_fn, x, params_list, stacked = request.getfixturevalue(setup)
    expected = np.stack([apply_fn(p, x) for p in params_list])
    for strategy in ("vmap", "loop"):
        teacher_apply = make_stacked_apply(apply_fn, strategy=strategy)
        assert teacher_apply.strategy == strategy
        np.testing.assert_allclose(teacher_apply(stacked, x), expected, rtol=1e-5, atol=1e-6)
    auto = make_stacked_apply(
        apply_fn, strategy="auto", example_params=stacked, example_x=x, num_repeats=1
    )
    assert auto.strategy in ("vmap", "loop")
    np.testing.assert_allclose(auto(stacked, x), expected, rtol=1e-5, atol=1e-6)
    # "auto" costs nothing per call: it runs the very program of the strategy it chose.
    chosen = make_stacked_apply(apply_fn, strategy=auto.strategy)
    assert str(jax.make_jaxpr(auto)(stacked, x)) == str(jax.make_jaxpr(chosen)(stacked, x))


def test_stacked_apply_inside_jit_and_argument_errors(mlp_setup):
    apply_fn, x, _, stacked = mlp_setup
    teacher_apply = make_stacked_apply(apply_fn, strategy="loop")
    outer = jax.jit(lambda p, x: jnp.mean(teacher_apply(p, x), axis=0))
    assert outer(stacked, x).shape == (x.shape[0], 5)
    with pytest.raises(ValueError, match=r"`strategy` must be one of \('vmap', 'loop', 'auto'\)"):
        make_stacked_apply(apply_fn, strategy="pmap")
    with pytest.raises(ValueError, match="pass `example_params`"):
        make_stacked_apply(apply_fn, strategy="auto")
    with pytest.raises(ValueError, match="call this outside `jax.jit`"):
        jax.jit(lambda p, x: choose_strategy(apply_fn, p, x))(stacked, x)
    with pytest.raises(ValueError, match="`num_repeats` must be an integer >= 1"):
        choose_strategy(apply_fn, stacked, x, num_repeats=0)
    with pytest.raises(ValueError, match="`min_seconds` must be >= 0"):
        teachers.time_strategies(apply_fn, stacked, x, min_seconds=-1.0)


def test_choose_strategy_probes_a_sub_batch_first(monkeypatch, mlp_setup):
    apply_fn, x, _, stacked = mlp_setup
    full = x.shape[0]

    def fake_timer(probe_timings, full_timings, full=full):
        sizes = []

        def fake(apply_fn, params, example_x, *, num_repeats):
            sizes.append(example_x.shape[0])
            return probe_timings if example_x.shape[0] < full else full_timings

        return fake, sizes

    # A decisive gap on the probe settles it: the slow strategy never runs at full size.
    fake, sizes = fake_timer({"vmap": 5.0, "loop": 1.0}, {"vmap": 0.1, "loop": 9.0})
    monkeypatch.setattr(teachers, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x) == "loop"
    assert sizes == [full // 4]
    # A close call on the probe is re-timed on the whole batch, whose ranking wins.
    fake, sizes = fake_timer({"vmap": 1.5, "loop": 1.0}, {"vmap": 1.0, "loop": 1.2})
    monkeypatch.setattr(teachers, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x) == "vmap"
    assert sizes == [full // 4, full]
    # probe_fraction=1 (or a probe below one example) times the full batch only.
    fake, sizes = fake_timer({"vmap": 5.0, "loop": 1.0}, {"vmap": 1.0, "loop": 2.0})
    monkeypatch.setattr(teachers, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x, probe_fraction=1.0) == "vmap"
    assert sizes == [full]
    fake, sizes = fake_timer({"vmap": 5.0, "loop": 1.0}, {"vmap": 1.0, "loop": 2.0}, full=3)
    monkeypatch.setattr(teachers, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x[:3]) == "vmap"
    assert sizes == [3]
    with pytest.raises(ValueError, match=r"`probe_fraction` must be in \(0, 1\]"):
        choose_strategy(apply_fn, stacked, x, probe_fraction=0.0)
    with pytest.raises(ValueError, match="`decisive_ratio` must be > 1"):
        choose_strategy(apply_fn, stacked, x, decisive_ratio=1.0)


def test_choose_strategy_picks_the_faster_of_the_timings(monkeypatch, mlp_setup):
    apply_fn, x, _, stacked = mlp_setup
    cases = [({"vmap": 1.0, "loop": 2.0}, "vmap"), ({"vmap": 3.0, "loop": 2.0}, "loop")]
    for timings, want in cases:
        monkeypatch.setattr(teachers, "time_strategies", lambda *a, t=timings, **k: t)
        assert choose_strategy(apply_fn, stacked, x) == want
        assert (
            make_stacked_apply(
                apply_fn, strategy="auto", example_params=stacked, example_x=x
            ).strategy
            == want
        )


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_teachers_are_frozen(strategy, mlp_setup):
    apply_fn, x, params_list, stacked = mlp_setup
    teacher_apply = make_stacked_apply(apply_fn, strategy=strategy)
    grads = jax.grad(lambda p: jnp.sum(teacher_apply(p, x) ** 2))(stacked)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
    hetero = make_heterogeneous_apply((apply_fn, apply_fn))
    grads = jax.grad(lambda p: jnp.sum(hetero(p, x) ** 2))(tuple(params_list[:2]))
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
    # Sanity: the same loss through the plain apply_fn does have a gradient.
    g = jax.grad(lambda p: jnp.sum(apply_fn(p, x) ** 2))(params_list[0])
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(g))


def test_heterogeneous_ensemble(mlp_setup, conv_setup):
    conv_apply, x_img, conv_params, _ = conv_setup
    # An MLP over the flattened image next to the conv net: different architectures.
    mlp = MLP(num_classes=5, features=(8,))
    mlp_params = init_params(mlp, _rbg(7), x_img[:1])
    teacher_apply = make_heterogeneous_apply((apply_fn_of(mlp), conv_apply))
    got = teacher_apply([mlp_params, conv_params[0]], x_img)
    assert got.shape == (2, x_img.shape[0], 5)
    np.testing.assert_allclose(got[0], apply_fn_of(mlp)(mlp_params, x_img), rtol=1e-6)
    np.testing.assert_allclose(got[1], conv_apply(conv_params[0], x_img), rtol=1e-6)

    three = MLP(num_classes=3, features=(8,))
    three_params = init_params(three, _rbg(8), x_img[:1])
    bad = make_heterogeneous_apply((apply_fn_of(three), conv_apply), names=("mlp3", "conv"))
    with pytest.raises(ValueError, match="different class counts: mlp3: 3, conv: 5"):
        bad((three_params, conv_params[0]), x_img)
    with pytest.raises(ValueError, match=r"one params pytree per teacher \(2\), got 1"):
        teacher_apply((mlp_params,), x_img)
    with pytest.raises(ValueError, match="`names` has 1 entries for 2"):
        make_heterogeneous_apply((conv_apply, conv_apply), names=("a",))
    with pytest.raises(TypeError, match="non-empty sequence"):
        make_heterogeneous_apply(())


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


def test_save_load_round_trip_and_fingerprint(tmp_path, mlp_setup, conv_setup):
    _, _, _, stacked = mlp_setup
    names = ["a", "b", "c"]
    record = save_teachers(tmp_path / "mlp", stacked, names=names, meta={"model": "mlp"})
    params, loaded = load_teachers(tmp_path / "mlp")
    jax.tree.map(np.testing.assert_array_equal, params, stacked)
    assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(lambda a: a.dtype, stacked)
    assert loaded == record
    assert loaded["names"] == names and loaded["meta"] == {"model": "mlp"}
    assert loaded["kind"] == "stacked" and loaded["num_teachers"] == K
    # Same identity as the student checkpointer's, so the record can be handed to it.
    assert loaded["fingerprint"] == params_fingerprint(stacked, names=names)
    assert teacher_fingerprint(params) == teacher_fingerprint(stacked)

    changed = jax.tree.map(lambda a: a, stacked)
    changed["Dense_1"]["bias"] = changed["Dense_1"]["bias"].at[1, 0].add(1e-3)
    assert teacher_fingerprint(changed)["sha256"] != teacher_fingerprint(stacked)["sha256"]
    assert teacher_fingerprint(changed)["leaves"] == teacher_fingerprint(stacked)["leaves"]

    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        save_teachers(tmp_path / "mlp", changed)
    save_teachers(tmp_path / "mlp", changed, overwrite=True)
    params, _ = load_teachers(tmp_path / "mlp")
    np.testing.assert_array_equal(params["Dense_1"]["bias"], changed["Dense_1"]["bias"])

    # Arrays swapped under a record they do not match are refused.
    save_teachers(tmp_path / "other", stacked)
    shutil.rmtree(tmp_path / "other" / "params")
    shutil.copytree(tmp_path / "mlp" / "params", tmp_path / "other" / "params")
    with pytest.raises(ValueError, match="do not match their recorded SHA-256"):
        load_teachers(tmp_path / "other")

    with pytest.raises(FileNotFoundError, match="holds no teachers checkpoint"):
        load_teachers(tmp_path / "missing")
    with pytest.raises(ValueError, match="`names` must be 3 strings"):
        save_teachers(tmp_path / "x", stacked, names=["a"])
    with pytest.raises(TypeError, match="`meta` must be JSON-serialisable"):
        save_teachers(tmp_path / "x", stacked, meta={"a": object()})


def test_save_load_heterogeneous_and_sharded(tmp_path, mlp_setup, conv_setup):
    _, _, mlp_params, _ = mlp_setup
    _, _, conv_params, _ = conv_setup
    hetero = (mlp_params[0], conv_params[0])
    save_teachers(tmp_path / "h", hetero, names=["mlp", "conv"])
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = NamedSharding(mesh, P())
    params, record = load_teachers(tmp_path / "h", sharding=replicated)
    assert isinstance(params, tuple) and record["kind"] == "tuple"
    jax.tree.map(np.testing.assert_array_equal, params, hetero)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(params))
