"""Teacher ensembles: stacked pytrees, stacked and heterogeneous inference, save and load.

Training teachers is tested in tests/test_teacher_training.py.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax import teachers
from mtkd_jax.models import MLP, SmallConvNet, apply_fn_of, init_params
from mtkd_jax.teachers import (
    autotune,
    choose_strategy,
    load_teachers,
    make_heterogeneous_apply,
    make_stacked_apply,
    num_stacked,
    save_teachers,
    stack_params,
    unstack_params,
)
from mtkd_jax.training.checkpoint import params_fingerprint

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


def test_num_stacked(mlp_setup):
    _, _, _, stacked = mlp_setup
    assert num_stacked(stacked) == K
    # Shapes only: the same K for abstract values and inside a trace.
    assert num_stacked(jax.eval_shape(lambda p: p, stacked)) == K
    assert jax.jit(lambda p: jnp.zeros(num_stacked(p)))(stacked).shape == (K,)
    with pytest.raises(ValueError, match=r"`teacher_params` is None; expected a stacked pytree"):
        num_stacked(None, "teacher_params")
    with pytest.raises(ValueError, match=r"`stacked` has no array leaves"):
        num_stacked({})
    with pytest.raises(ValueError, match=r"`tp` leaves disagree on the leading teacher axis K: 2 "):
        num_stacked({"a": jnp.zeros((2, 4)), "b": jnp.zeros((3, 4))}, "tp")


@pytest.mark.parametrize("setup", ["mlp_setup", "conv_setup"])
def test_strategies_give_the_same_logits(setup, request):
    apply_fn, x, params_list, stacked = request.getfixturevalue(setup)
    expected = np.stack([apply_fn(p, x) for p in params_list])
    programs = {}
    for strategy in ("vmap", "loop"):
        teacher_apply = make_stacked_apply(apply_fn, strategy=strategy)
        np.testing.assert_allclose(teacher_apply(stacked, x), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            jax.jit(teacher_apply)(stacked, x), expected, rtol=1e-5, atol=1e-6
        )
        programs[strategy] = str(jax.make_jaxpr(teacher_apply)(stacked, x))
    assert programs["vmap"] != programs["loop"]
    auto = make_stacked_apply(
        apply_fn, strategy="auto", example_params=stacked, example_x=x, num_repeats=1
    )
    np.testing.assert_allclose(auto(stacked, x), expected, rtol=1e-5, atol=1e-6)
    # "auto" costs nothing per call: it runs the very program of the strategy it chose.
    assert str(jax.make_jaxpr(auto)(stacked, x)) in programs.values()


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
    with pytest.raises(ValueError, match="`num_repeats` must be an int >= 1"):
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
    monkeypatch.setattr(autotune, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x) == "loop"
    assert sizes == [full // 4]
    # A close call on the probe is re-timed on the whole batch, whose ranking wins.
    fake, sizes = fake_timer({"vmap": 1.5, "loop": 1.0}, {"vmap": 1.0, "loop": 1.2})
    monkeypatch.setattr(autotune, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x) == "vmap"
    assert sizes == [full // 4, full]
    # probe_fraction=1 (or a probe below one example) times the full batch only.
    fake, sizes = fake_timer({"vmap": 5.0, "loop": 1.0}, {"vmap": 1.0, "loop": 2.0})
    monkeypatch.setattr(autotune, "time_strategies", fake)
    assert choose_strategy(apply_fn, stacked, x, probe_fraction=1.0) == "vmap"
    assert sizes == [full]
    fake, sizes = fake_timer({"vmap": 5.0, "loop": 1.0}, {"vmap": 1.0, "loop": 2.0}, full=3)
    monkeypatch.setattr(autotune, "time_strategies", fake)
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
        monkeypatch.setattr(autotune, "time_strategies", lambda *a, t=timings, **k: t)
        assert choose_strategy(apply_fn, stacked, x) == want
        # "auto" builds the program of the strategy choose_strategy picked.
        auto = make_stacked_apply(apply_fn, strategy="auto", example_params=stacked, example_x=x)
        chosen = make_stacked_apply(apply_fn, strategy=want)
        assert str(jax.make_jaxpr(auto)(stacked, x)) == str(jax.make_jaxpr(chosen)(stacked, x))


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
    np.testing.assert_allclose(got[0], apply_fn_of(mlp)(mlp_params, x_img), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], conv_apply(conv_params[0], x_img), rtol=1e-6, atol=1e-6)

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


def test_factories_return_plain_unjitted_functions(mlp_setup):
    apply_fn, x, params_list, stacked = mlp_setup
    pair = tuple(params_list[:2])
    cases = [
        (make_stacked_apply(apply_fn, strategy="vmap"), stacked, K),
        (make_stacked_apply(apply_fn, strategy="loop"), stacked, K),
        (make_heterogeneous_apply((apply_fn, apply_fn)), pair, 2),
    ]
    for teacher_apply, params, k in cases:
        # No hidden state on the function, and not a jitted one (the caller jits).
        assert not hasattr(teacher_apply, "strategy")
        assert not hasattr(teacher_apply, "lower")
        assert not isinstance(teacher_apply, type(jax.jit(apply_fn)))
        eager = teacher_apply(params, x)
        jitted = jax.jit(teacher_apply)(params, x)
        outer = jax.jit(lambda p, x, f=teacher_apply: jnp.mean(f(p, x), axis=0))(params, x)
        assert eager.shape == jitted.shape == (k, x.shape[0], 5)
        np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(outer, jnp.mean(jitted, axis=0), rtol=1e-6, atol=1e-7)


def test_teacher_apply_names_bad_arguments(mlp_setup):
    apply_fn, x, params_list, stacked = mlp_setup
    pair = tuple(params_list[:2])
    stacked_apply = make_stacked_apply(apply_fn, strategy="vmap")
    hetero = make_heterogeneous_apply((apply_fn, apply_fn))
    # A step called without teacher params hands None over; eagerly and inside a jit, the
    # error names the argument and what it should be (not vmap's "non-None value in in_axes").
    for call in (stacked_apply, jax.jit(stacked_apply)):
        with pytest.raises(ValueError, match=r"`teacher_params` is None; expected a stacked "):
            call(None, x)
    for call in (hetero, jax.jit(hetero)):
        with pytest.raises(
            ValueError,
            match=r"`teacher_params` must be a tuple holding one params pytree per "
            r"teacher \(2\), got None",
        ):
            call(None, x)
    with pytest.raises(ValueError, match=r"`teacher_params` must be a tuple .*, got a dict"):
        hetero(stacked, x)
    with pytest.raises(ValueError, match=r"`teacher_params` leaf .* is a scalar"):
        stacked_apply({"w": jnp.zeros(())}, x)
    for teacher_apply, params in ((stacked_apply, stacked), (hetero, pair)):
        with pytest.raises(ValueError, match=r"`x` must be a batch \[B, ...\].*got shape \(\)"):
            teacher_apply(params, jnp.float32(1.0))
        with pytest.raises(ValueError, match=r"`x` must be a batch \[B, ...\].*got None"):
            teacher_apply(params, None)


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
    assert params_fingerprint(params) == params_fingerprint(stacked)

    changed = jax.tree.map(lambda a: a, stacked)
    changed["Dense_1"]["bias"] = changed["Dense_1"]["bias"].at[1, 0].add(1e-3)
    assert params_fingerprint(changed)["sha256"] != params_fingerprint(stacked)["sha256"]
    assert params_fingerprint(changed)["leaves"] == params_fingerprint(stacked)["leaves"]

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
