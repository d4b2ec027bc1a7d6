"""NNX and Linen models with Dropout and BatchNorm through the library's steps.

Dropout masks come from the step key (different per step, identical on resume); BatchNorm
statistics change in training and not in evaluation; NNX and the equivalent Linen model give
the same logits and the same step; any `nnx.split` layout; K NNX teachers stacked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtkd_jax as mk
from mtkd_jax.models.zoo import nnx as nm

D, C, B, K = 12, 4, 16, 3
KEY = jax.random.key(0)


def _data(rng, b=B):
    x = jnp.asarray(rng.normal(size=(b, D)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, size=b), jnp.int32)
    return {"x": x, "y": y}


def _student(seed=0, **kwargs):
    kwargs = {"features": (16,), "dropout": 0.5, "batch_norm": True, **kwargs}
    return nm.MLP(D, C, rngs=nnx.Rngs(seed), **kwargs)


def _max_diff(a, b):
    return max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b), strict=True))


def test_dropout_masks_come_from_the_step_key(rng):
    model, params, model_state = mk.nnx_split(_student(batch_norm=False))
    x = _data(rng)["x"]
    run = jax.jit(lambda k: model(params, model_state, x, train=True, key=k)[0])
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    # Evaluation: no dropout, deterministic, no key needed.
    variables = mk.models.model_variables(params, model_state)
    e = model.eval_apply(variables, x)
    np.testing.assert_array_equal(e, model.eval_apply(variables, x))
    assert not np.allclose(a, e)
    # Within a step: lr 0, the same batch, two steps give two losses (two masks).
    tx = optax.sgd(0.0)
    step = jax.jit(mk.make_supervised_step(model, tx))
    state = mk.init_train_state(params, tx, model_state=model_state)
    batch = _data(rng)
    s1, m0 = step(state, batch, KEY)
    _, m1 = step(s1, batch, KEY)
    assert float(m0["loss"]) != float(m1["loss"])


def test_dropout_and_batch_stats_resume_bit_identically(tmp_path, rng):
    model, params, model_state = mk.nnx_split(_student())
    tx = optax.adam(1e-2)
    step = jax.jit(mk.make_supervised_step(model, tx))
    data = [_data(rng) for _ in range(3)]

    def batches(epoch, start):
        return iter(data[start:])

    def fit(num_epochs, directory):
        state = mk.init_train_state(params, tx, model_state=model_state)
        return mk.fit(state, step, batches, num_epochs=num_epochs, steps_per_epoch=3,
                      key=KEY, checkpoint_dir=directory, progress=False, async_save=False)

    whole = fit(3, tmp_path / "whole")
    fit(2, tmp_path / "resumed")
    resumed = fit(3, tmp_path / "resumed")
    assert resumed.resumed_from == 6 and resumed.step == 9
    assert _max_diff(whole.state, resumed.state) == 0.0
    assert [r["loss"] for r in whole.history["train"]] == [
        r["loss"] for r in resumed.history["train"]
    ]
    # The batch statistics are part of the checkpointed state and moved during training.
    assert _max_diff(whole.state.model_state, model_state) > 0


def test_batch_stats_change_in_training_and_not_in_eval(rng):
    module = _student(dropout=0.0)
    model, params, model_state = mk.nnx_split(module)
    x = _data(rng)["x"]
    _, trained = model(params, model_state, x, train=True, key=KEY)
    mean = trained["norms"][0]["mean"][...]
    h = x @ params["dense"][0]["kernel"][...] + params["dense"][0]["bias"][...]
    np.testing.assert_allclose(mean, 0.01 * h.mean(0), rtol=1e-5, atol=1e-7)  # momentum 0.99
    logits, untouched = model(params, trained, x, train=False)
    assert _max_diff(untouched, trained) == 0.0
    # Evaluation uses the running statistics (not the batch's).
    norm = params["norms"][0]
    var = trained["norms"][0]["var"][...]
    hn = (h - mean) / jnp.sqrt(var + 1e-5) * norm["scale"][...] + norm["bias"][...]
    out = params["out"]
    want = jax.nn.relu(hn) @ out["kernel"][...] + out["bias"][...]
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    # Teachers and evaluate run frozen, in eval mode, whatever the module's own mode.
    module.train()
    teacher = mk.make_stacked_apply(module, runner="loop")
    variables = mk.stack_params([mk.models.model_variables(params, trained)])
    np.testing.assert_allclose(teacher(variables, x)[0], logits, rtol=1e-6, atol=1e-6)


def _linen_to_nnx(lp, lstate, module):
    """Copy Linen MLP(batch_norm=True) variables into the equivalent NNX MLP's states."""
    _, params, model_state = mk.nnx_split(module)
    n = len(module.dense)
    for i in range(n):
        params["dense"][i]["kernel"][...] = lp[f"Dense_{i}"]["kernel"]
        params["dense"][i]["bias"][...] = lp[f"Dense_{i}"]["bias"]
        for name in ("scale", "bias"):
            params["norms"][i][name][...] = lp[f"BatchNorm_{i}"][name]
        for name in ("mean", "var"):
            model_state["norms"][i][name][...] = lstate["batch_stats"][f"BatchNorm_{i}"][name]
    params["out"]["kernel"][...] = lp[f"Dense_{n}"]["kernel"]
    params["out"]["bias"][...] = lp[f"Dense_{n}"]["bias"]
    return params, model_state


def test_nnx_and_linen_give_the_same_logits_and_the_same_step(rng):
    linen = mk.linen_model(mk.models.MLP(num_classes=C, features=(16, 8), batch_norm=True))
    lp, lstate = linen.init(jax.random.key(3), jnp.zeros((1, D)))
    module = nm.MLP(D, C, features=(16, 8), batch_norm=True, rngs=nnx.Rngs(0))
    model, _, _ = mk.nnx_split(module)
    params, model_state = _linen_to_nnx(lp, lstate, module)
    batch = _data(rng)
    for train in (True, False):
        a, sa = linen(lp, lstate, batch["x"], train=train, key=KEY)
        b, sb = model(params, model_state, batch["x"], train=train, key=KEY)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sa["batch_stats"]["BatchNorm_1"]["var"],
                                   sb["norms"][1]["var"][...], rtol=1e-6)
    tx = optax.adam(1e-2)
    ls = mk.init_train_state(lp, tx, model_state=lstate)
    ns = mk.init_train_state(params, tx, model_state=model_state)
    for _ in range(3):
        ls, lm = jax.jit(mk.make_supervised_step(linen, tx))(ls, batch, KEY)
        ns, nm_ = jax.jit(mk.make_supervised_step(model, tx))(ns, batch, KEY)
        np.testing.assert_allclose(lm["loss"], nm_["loss"], rtol=1e-5)
    p2, s2 = _linen_to_nnx(ls.params, ls.model_state, module)
    assert _max_diff(p2, ns.params) < 1e-5 and _max_diff(s2, ns.model_state) < 1e-5


def test_any_split_layout_and_either_mode_give_one_model(rng):
    module = _student()
    module.eval()  # split in eval mode: the library still trains with dropout on
    x = _data(rng)["x"]
    ref_model, params, model_state = mk.nnx_split(module)
    layouts = [
        nnx.split(module),
        nnx.split(module, nnx.Param, ...),
        nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState),
    ]
    ref = ref_model(params, model_state, x, train=True, key=KEY)
    assert not np.allclose(ref[0], ref_model.eval_apply(mk.models.model_variables(params,
                                                                           model_state), x))
    for graphdef, *states in layouts:
        model, p, s = mk.nnx_split(graphdef, *states)
        got = model(p, s, x, train=True, key=KEY)
        assert _max_diff(got, ref) == 0.0
    # The plain frozen apply_fn takes the three-way split, and names the mistake of
    # differentiating RNG state.
    graphdef, p, rest = nnx.split(module, nnx.Param, ...)
    frozen = jax.jit(mk.models.nnx_apply_fn(graphdef, rest))
    np.testing.assert_allclose(
        frozen(p, x), ref_model.eval_apply(mk.models.model_variables(params, model_state), x),
        rtol=1e-6, atol=1e-6,
    )
    graphdef, everything = nnx.split(module)
    with pytest.raises(ValueError, match="nnx_split"):
        mk.models.nnx_apply_fn(graphdef)(everything, x)
    step = mk.make_supervised_step(mk.models.nnx_apply_fn(graphdef, rest), optax.sgd(0.1),
                                   pass_key=True)
    state = mk.init_train_state(p, optax.sgd(0.1))
    with pytest.raises(ValueError, match="takes no key"):
        step(state, {"x": x, "y": jnp.zeros(B, jnp.int32)}, KEY)


@pytest.mark.slow  # a whole run in a subprocess or many compiles: kept out of the 10-minute suite
def test_stacked_nnx_teachers_train_and_run_as_one_ensemble(rng):
    teachers = [
        nm.CNN1D(D, C, features=(4, 4), hidden=8, dropout=0.3, batch_norm=True,
                 rngs=nnx.Rngs(i))
        for i in range(K)
    ]
    model, params, model_state = mk.nnx_split(teachers)
    tx = optax.adam(1e-2)
    state = mk.init_stacked_train_state(params, tx, model_state=model_state)
    step = jax.jit(mk.stacked_step(mk.make_supervised_step(model, tx)))
    batch = _data(rng)
    for _ in range(2):
        state, metrics = step(state, batch, KEY)
    assert metrics["loss"].shape == (K,)
    variables = mk.variables_of(state)
    outs = {s: jax.jit(mk.make_stacked_apply(model, runner=s))(variables, batch["x"])
            for s in ("vmap", "loop")}
    np.testing.assert_allclose(outs["vmap"], outs["loop"], rtol=1e-5, atol=1e-6)
    one = mk.teachers.unstack_params(variables)[1]
    np.testing.assert_allclose(outs["loop"][1], model.eval_apply(one, batch["x"]), atol=1e-6)
    # Distil an NNX student with Dropout and BatchNorm from them; codistil them.
    student, sp, ss = mk.nnx_split(_student())
    s_state = mk.init_train_state(sp, tx, model_state=ss)
    dstep = jax.jit(mk.make_distill_step(student, mk.make_stacked_apply(model, runner="loop"),
                                         tx, temperature=2.0, alpha=0.5))
    s_state, dm = dstep(s_state, batch, KEY, teacher_params=variables)
    assert np.isfinite(float(dm["loss"])) and _max_diff(s_state.model_state, ss) > 0
    cstate, cm = jax.jit(mk.make_codistill_step(model, tx))(state, batch, KEY)
    assert cm["model_loss"].shape == (K,) and _max_diff(cstate.model_state,
                                                       state.model_state) > 0
    report = mk.evaluate(mk.make_eval_step(student, mk.make_stacked_apply(model,
                                                                           runner="loop")),
                         mk.variables_of(s_state), [batch], teacher_params=variables)
    assert sorted(report) == ["ensemble", "student", "teacher_0", "teacher_1", "teacher_2"]


def test_batch_norm_student_data_parallel_equals_one_device(rng):
    model, params, model_state = mk.nnx_split(_student())
    tx = optax.sgd(0.1)
    batch = _data(rng, b=32)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = mk.make_mesh(devices=devices)
        step = mk.data_parallel_step(mk.make_supervised_step(model, tx), mesh, num_classes=C)
        state = mk.place(mk.init_train_state(params, tx, model_state=model_state), mesh)
        for _ in range(2):
            state, _ = step(state, batch, KEY)
        out.append(jax.device_get(state))
    assert _max_diff(out[0], out[1]) < 1e-5


def test_model_errors():
    with pytest.raises(ValueError, match="variables"):
        mk.as_model(_student()).eval_apply({"w": jnp.ones(2)}, jnp.ones((2, D)))
    with pytest.raises(ValueError, match="pass_key"):
        mk.make_supervised_step(mk.as_model(_student()), optax.sgd(0.1), pass_key=True)
    with pytest.raises(TypeError, match="plain `apply_fn"):
        mk.as_model(3)
    model, params, model_state = mk.nnx_split(_student())
    with pytest.raises(ValueError, match="needs the step's key"):
        model(params, model_state, jnp.ones((2, D)), train=True)
    with pytest.raises(ValueError, match="another architecture"):
        mk.nnx_split([_student(), _student(features=(8,))])


@pytest.mark.parametrize(
    "name, kwargs, in_kwargs, x_shape",
    [
        ("mlp", {"features": (8, 8), "batch_norm": True}, {"in_features": 12}, (2, 12)),
        ("cnn1d", {"features": (4, 4, 8), "hidden": 8, "batch_norm": True},
         {"in_length": 40}, (2, 40)),
        ("convnet", {"widths": (4, 8)}, {"in_channels": 3}, (2, 8, 8, 3)),
        ("small_convnet", {"widths": (4, 8)}, {"in_channels": 1}, (2, 8, 8)),
        ("resnet", {"widths": (8, 16), "blocks": (1, 1), "num_groups": 4},
         {"in_channels": 3}, (2, 8, 8, 3)),
        ("resnet", {"widths": (8, 16), "blocks": (1, 1), "norm": None},
         {"in_channels": 3}, (2, 8, 8, 3)),
    ],
)
def test_nnx_reference_models_match_linen_in_size_and_shape(name, kwargs, in_kwargs, x_shape):
    x = jnp.zeros(x_shape)
    linen = mk.linen_model(mk.models.make_model(name, num_classes=C, **kwargs))
    lp, lstate = jax.eval_shape(linen.init, jax.random.key(0), x)
    module = nnx.eval_shape(lambda: mk.models.make_model(name, num_classes=C, api="nnx", **kwargs,
                                                  **in_kwargs, rngs=nnx.Rngs(0)))
    _, params, model_state = mk.nnx_split(module)
    assert mk.models.count_params(params) == mk.models.count_params(lp)
    assert mk.models.count_params(model_state) == mk.models.count_params(lstate)
    logits = jax.eval_shape(lambda p, s: mk.as_model(module)(p, s, x, train=False)[0],
                            params, model_state)
    assert logits.shape == (2, C) and logits.dtype == jnp.float32


def test_batch_norm_student_in_a_per_device_step_keeps_one_state(rng):
    """shard_map: statistics of each device's rows, averaged over the devices after the step."""
    model, params, model_state = mk.nnx_split(_student())
    tx = optax.sgd(0.1)
    mesh = mk.make_mesh()
    step = mk.data_parallel_step(mk.make_supervised_step(model, tx, axis_name="data"), mesh,
                                 mode="shard_map", num_classes=C)
    state = mk.place(mk.init_train_state(params, tx, model_state=model_state), mesh)
    batch = _data(rng, b=32)
    state, metrics = step(state, batch, KEY)
    mean = state.model_state["norms"][0]["mean"][...]
    h = batch["x"] @ params["dense"][0]["kernel"][...] + params["dense"][0]["bias"][...]
    # The mean of the per-device means is the global mean (equal rows per device).
    np.testing.assert_allclose(mean, 0.01 * h.mean(0), rtol=1e-4, atol=1e-6)
    assert np.isfinite(float(metrics["loss"]))


def test_forgotten_model_state_is_named(rng):
    """A BatchNorm model trained from `init_train_state(params, tx)` (no `model_state=`)."""
    model, params, _ = mk.nnx_split(_student())
    tx = optax.sgd(0.1)
    step = jax.jit(mk.make_supervised_step(model, tx))
    with pytest.raises(ValueError, match=r"`model_state`.*init_train_state\(.*model_state="):
        step(mk.init_train_state(params, tx), _data(rng), KEY)
    linen = mk.linen_model(mk.models.make_model("mlp", num_classes=C, features=(8,),
                                         batch_norm=True))
    lp, _ = linen.init(KEY, jnp.zeros((2, D)))
    lstep = jax.jit(mk.make_supervised_step(linen, tx))
    with pytest.raises(ValueError, match=r"`model_state`.*init_train_state\(.*model_state="):
        lstep(mk.init_train_state(lp, tx), _data(rng), KEY)


def test_mismatched_stacks_name_the_module_and_the_parameter():
    class Wide(nnx.Module):
        def __init__(self, width, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (D, width)))
            self.bn = nnx.BatchNorm(width, rngs=rngs)

        def __call__(self, x):
            return self.bn(x @ self.w)

    with pytest.raises(ValueError, match=r"`module\[2\]`.*params \['bn'\]\['bias'\].*"
                                         r"\(6,\).*`module\[0\]`.*\(5,\)"):
        mk.nnx_split([Wide(5, nnx.Rngs(0)), Wide(5, nnx.Rngs(1)), Wide(6, nnx.Rngs(2))])

    class Plain(nnx.Module):  # one graphdef for every width: only the shapes differ
        def __init__(self, width, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (D, width)))

        def __call__(self, x):
            return x @ self.w

    with pytest.raises(ValueError, match=r"`module\[1\]`.*params \['w'\].*\(12, 6\).*"
                                         r"`module\[0\]`.*\(12, 5\)"):
        mk.nnx_split([Plain(5, nnx.Rngs(0)), Plain(6, nnx.Rngs(1))])
    # One model's state beside K stacked params: the width is not read as a teacher count.
    _, params, _ = mk.nnx_split([Wide(128, nnx.Rngs(i)) for i in range(3)])
    _, _, one_state = mk.nnx_split(Wide(128, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="one model's") as err:
        mk.init_stacked_train_state(params, optax.sgd(0.1), model_state=one_state)
    assert "stacks 128 models" not in str(err.value)
