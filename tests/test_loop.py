"""Tests for mtkd_jax.training.fit.fit on a tiny linear regression with an explicit reference
loop."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax.training.checkpoint import Checkpointer, params_fingerprint
from mtkd_jax.training.fit import FitResult, NonFiniteLossError, fit

N, D, BATCH = 48, 3, 8
SPE = N // BATCH  # 6 steps per epoch


class State(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + 0.5 + 0.05 * rng.normal(size=N)).astype(np.float32)
    return x, y


def _init(tx):
    params = {"w": jnp.zeros(D, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return State(jnp.asarray(0, jnp.int32), params, tx.init(params))


# Module-level optimizers and a cached step factory: each jitted step compiles once per file.
SGD = optax.sgd(0.1)
ADAM = optax.adam(0.05)
MOMENTUM = optax.sgd(0.05, momentum=0.9)


@functools.cache
def _make_step(tx, *, noise=1e-3, donate=False):
    def step(state, batch, key):
        def loss_fn(p):
            pred = batch["x"] @ p["w"] + p["b"]
            return jnp.mean((pred - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        # Gradient noise from the per-step key's bits, so a wrong key schedule changes the
        # result; cheaper to compile than a threefry draw (~1 s here). Like the library's
        # steps, the step folds its own counter into the key `fit` passes unchanged.
        bits = jax.random.key_data(jax.random.fold_in(key, state.step))[-1]
        grads = jax.tree.map(lambda g: g + noise * ((bits % 1024) / 512.0 - 1.0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = State(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def _make_batches(x, y, *, seed=0, poison=None):
    """Batches in an order fixed by (seed, epoch); `poison` maps a global step to a fault."""

    def batches_fn(epoch, start):
        order = np.random.default_rng([seed, epoch]).permutation(N)
        for i in range(start, SPE):
            idx = order[i * BATCH : (i + 1) * BATCH]
            batch = {"x": x[idx], "y": y[idx]}
            fault = (poison or {}).get(epoch * SPE + i)
            if fault == "crash":
                raise RuntimeError(f"simulated crash at step {epoch * SPE + i}")
            if fault == "nan":
                batch["x"] = np.full_like(batch["x"], np.nan)
            yield batch

    return batches_fn


X, Y = _data()


def _fit(tx, *, step_fn=None, batches_fn=None, **kwargs):
    """`fit` on the shared problem from a fresh state; keyword arguments override defaults."""
    kwargs = {"steps_per_epoch": SPE, "key": jax.random.key(0), "progress": False, **kwargs}
    step_fn = step_fn or _make_step(tx)
    return fit(_init(tx), step_fn, batches_fn or _make_batches(X, Y), **kwargs)


def _reference(state, step_fn, batches_fn, *, steps, key):
    """The plain loop `fit` must reproduce exactly: `steps` updates from a fresh state."""
    losses = []
    for epoch in range(-(-steps // SPE)):
        for _, batch in zip(
            range(min(SPE, steps - epoch * SPE)), batches_fn(epoch, 0), strict=False
        ):
            state, metrics = step_fn(state, batch, key)
            losses.append(float(metrics["loss"]))
    return state, losses


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _accuracy_script(values, every):
    """An eval_fn that reports `values[i]` at the i-th evaluation (by state.step)."""
    return lambda state: {"accuracy": values[int(state.step) // every - 1], "loss": 0.0}


def test_fit_matches_reference_loop_and_loss_goes_down():
    tx = SGD
    step_fn, key = _make_step(tx), jax.random.key(1)
    out = _fit(tx, step_fn=step_fn, num_epochs=5, key=key, check_every=4)
    ref_state, ref_losses = _reference(
        _init(tx), step_fn, _make_batches(X, Y), steps=5 * SPE, key=key
    )
    assert isinstance(out, FitResult)
    assert out.step == 5 * SPE and int(out.state.step) == 5 * SPE
    assert out.resumed_from is None and not out.stopped_early and out.best is None
    _assert_trees_equal(out.state, ref_state)
    # The per-step keys matter: another key gives other params.
    other = _fit(tx, num_epochs=5, key=jax.random.key(2))
    assert not np.array_equal(
        np.asarray(other.state.params["w"]), np.asarray(out.state.params["w"])
    )
    train = out.history["train"]
    assert [r["step"] for r in train] == [SPE * (e + 1) for e in range(5)]
    assert [r["epoch"] for r in train] == list(range(5))
    assert all(r["steps"] == SPE for r in train)
    for e, record in enumerate(train):
        want = np.mean(np.asarray(ref_losses[e * SPE : (e + 1) * SPE], np.float32))
        np.testing.assert_allclose(record["loss"], want, rtol=1e-6)
    assert train[-1]["loss"] < 0.1 * train[0]["loss"]
    assert out.history["eval"] == []


def test_donated_state_and_async_save_give_the_same_run(tmp_path):
    tx = MOMENTUM
    plain = _fit(tx, num_epochs=2)
    donated = _fit(
        tx, step_fn=_make_step(tx, donate=True), num_epochs=2, checkpoint_dir=tmp_path, save_every=5
    )
    _assert_trees_equal(donated.state, plain.state)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [10, 2 * SPE]
        _assert_trees_equal(ckpt.restore(_init(tx)).state, plain.state)


def test_check_every_does_not_change_the_run():
    tx = ADAM
    runs = [_fit(tx, num_epochs=2, key=jax.random.key(3), check_every=c) for c in (1, 5, 100)]
    for run in runs[1:]:
        _assert_trees_equal(run.state, runs[0].state)
        assert run.history == runs[0].history


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    tx = ADAM
    every = 2
    script = [0.5, 0.7, 0.6, 0.65, 0.9, 0.95]
    kwargs = dict(
        num_epochs=3,
        eval_fn=_accuracy_script(script, every),
        eval_every=every,
        patience=2,
        checkpoint_dir=tmp_path,
        save_every=5,
    )
    out = _fit(tx, **kwargs)
    # Best at the 2nd evaluation (step 4); the 3rd and 4th do not improve: stop at step 8.
    assert out.stopped_early
    assert out.step == 4 * every
    assert [r["accuracy"] for r in out.history["eval"]] == script[:4]
    assert out.best["step"] == 2 * every and out.best["accuracy"] == 0.7
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps("best") == [2 * every]
        assert ckpt.all_steps() == [5, 4 * every]
        best = ckpt.restore(_init(tx), which="best")
    assert best.metadata["metrics"]["accuracy"] == 0.7
    assert int(best.state.step) == 2 * every
    # The stopped epoch's partial train record covers the 2 steps run in epoch 1.
    assert out.history["train"][-1]["steps"] == 4 * every - SPE
    # Calling fit again on the directory stays stopped: patience already ran out.
    again = _fit(tx, **kwargs)
    assert again.stopped_early and again.step == out.step and again.resumed_from == out.step
    _assert_trees_equal(again.state, out.state)


def test_early_stopping_min_mode_with_min_delta():
    tx = SGD
    script = [1.0, 0.95, 0.5, 0.48, 0.47, 0.2]
    out = _fit(
        tx,
        num_epochs=6,
        eval_fn=lambda s: {"loss": script[int(s.step) // SPE - 1]},
        best_metric="loss",
        best_mode="min",
        min_delta=0.1,
        patience=2,
    )
    # 0.95 is not 0.1 better than 1.0; 0.5 is; 0.48 and 0.47 are not: stop after 5 epochs.
    assert out.stopped_early and out.step == 5 * SPE
    assert out.best["loss"] == 0.5 and out.best["step"] == 3 * SPE


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tx = ADAM
    bad = SPE + 3  # global step 9: epoch 1, batch 3
    poisoned = _make_batches(X, Y, poison={bad: "nan"})
    with pytest.raises(NonFiniteLossError, match=rf"at step {bad} .*epoch 1, batch 3") as info:
        _fit(
            tx,
            batches_fn=poisoned,
            num_epochs=3,
            checkpoint_dir=tmp_path,
            save_every=4,
            check_every=5,
        )
    assert isinstance(info.value, FloatingPointError)
    assert info.value.step == bad
    assert info.value.last_checkpoint_step == 8
    assert "the last good checkpoint is step 8" in str(info.value)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [4, 8]
        restored = ckpt.restore(_init(tx))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(restored.state))
    # The checkpoint is the state after the 8 clean updates.
    ref, _ = _reference(
        _init(tx), _make_step(tx), _make_batches(X, Y), steps=8, key=jax.random.key(0)
    )
    _assert_trees_equal(restored.state, ref)


def test_non_finite_state_is_never_saved(tmp_path):
    """A finite loss but an update that makes the params inf: refused at the next save."""
    tx = SGD
    inner = _make_step(tx)

    @jax.jit
    def step_fn(state, batch, key):
        new, metrics = inner(state, batch, key)
        blow_up = jnp.where(state.step == 5, jnp.inf, 1.0)
        return new._replace(params=jax.tree.map(lambda p: p * blow_up, new.params)), metrics

    with pytest.raises(NonFiniteLossError, match="the state after step 6 holds NaN/inf"):
        _fit(tx, step_fn=step_fn, num_epochs=2, checkpoint_dir=tmp_path, save_every=3)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [3]


def test_resume_after_normal_stop_continues_the_step_count(tmp_path):
    tx = ADAM
    kwargs = dict(key=jax.random.key(7), eval_fn=lambda s: {"accuracy": 0.0})
    straight = _fit(tx, num_epochs=4, **kwargs)
    first = _fit(tx, num_epochs=2, checkpoint_dir=tmp_path, **kwargs)
    assert first.step == 2 * SPE and first.resumed_from is None
    second = _fit(tx, num_epochs=4, checkpoint_dir=tmp_path, **kwargs)
    assert second.resumed_from == 2 * SPE and second.step == 4 * SPE
    _assert_trees_equal(second.state, straight.state)
    assert second.history == straight.history
    assert second.best == straight.best
    # Nothing left to do: the state comes back as restored.
    third = _fit(tx, num_epochs=4, checkpoint_dir=tmp_path, **kwargs)
    assert third.resumed_from == 4 * SPE and third.step == 4 * SPE
    _assert_trees_equal(third.state, straight.state)


def test_resume_after_crash_mid_epoch_matches_uninterrupted_run(tmp_path):
    """Crash at step 13, after the last save at 10 and a best checkpoint at 12 (a lost future)."""
    tx = ADAM
    script = [0.1, 0.2, 0.3, 0.25, 0.5, 0.55, 0.6, 0.1, 0.2]
    kwargs = dict(
        num_epochs=3,
        key=jax.random.key(5),
        eval_every=2,
        eval_fn=_accuracy_script(script, 2),
        save_every=5,
        check_every=3,
    )
    straight = _fit(tx, **kwargs)
    crash = _make_batches(X, Y, poison={13: "crash"})
    with pytest.raises(RuntimeError, match="simulated crash at step 13"):
        _fit(tx, batches_fn=crash, checkpoint_dir=tmp_path, **kwargs)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 10 and ckpt.best_step() == 12
    resumed = _fit(tx, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.resumed_from == 10
    _assert_trees_equal(resumed.state, straight.state)
    assert resumed.history == straight.history
    assert resumed.best == straight.best and resumed.best["step"] == 14
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.best_step() == 14
        assert ckpt.all_steps() == [15, 18]


def test_fingerprint_mismatch_and_changed_epoch_length_are_refused(tmp_path):
    tx = SGD
    fp = params_fingerprint({"w": jnp.ones((2, D))}, names=["t0", "t1"])
    _fit(tx, num_epochs=1, checkpoint_dir=tmp_path, fingerprint=fp)
    other = params_fingerprint({"w": 2 * jnp.ones((2, D))}, names=["t0", "t1"])
    with pytest.raises(ValueError, match="different teachers.*content sha256"):
        _fit(tx, num_epochs=1, checkpoint_dir=tmp_path, fingerprint=other)
    with pytest.raises(ValueError, match="steps_per_epoch=6, not 3"):
        _fit(tx, num_epochs=1, checkpoint_dir=tmp_path, fingerprint=fp, steps_per_epoch=3)


def test_checkpoint_not_written_by_fit_is_refused(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, _init(SGD))
    with pytest.raises(ValueError, match="holds no loop state"):
        _fit(SGD, num_epochs=1, checkpoint_dir=tmp_path)


def test_log_fn_sees_every_step_in_order_and_each_eval():
    tx = SGD
    calls = []
    _fit(
        tx,
        num_epochs=2,
        eval_fn=lambda s: {"accuracy": 1.0},
        eval_every=4,
        check_every=3,
        log_fn=lambda step, m: calls.append((step, m)),
    )
    train = [(s, m) for s, m in calls if "train/loss" in m]
    evals = [(s, m) for s, m in calls if "eval/accuracy" in m]
    assert [s for s, _ in train] == list(range(1, 2 * SPE + 1))
    assert all(set(m) == {"train/loss", "train/grad_norm"} for _, m in train)
    assert all(isinstance(m["train/loss"], float) for _, m in train)
    assert evals == [(s, {"eval/accuracy": 1.0}) for s in (4, 8, 12)]
    assert len(calls) == len(train) + len(evals)


def test_progress_bar_shows_rate(capsys):
    tx = SGD
    _fit(tx, num_epochs=1, progress=True)
    err = capsys.readouterr().err
    assert f"{SPE}/{SPE}" in err and "step/s" in err
    _fit(tx, num_epochs=1, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_arguments_and_bad_callbacks():
    tx = SGD
    with pytest.raises(ValueError, match="`num_epochs` must be an int >= 1"):
        _fit(tx, num_epochs=0)
    with pytest.raises(ValueError, match="`steps_per_epoch` must be an int >= 1"):
        _fit(tx, num_epochs=1, steps_per_epoch=2.5)
    with pytest.raises(ValueError, match="`best_mode` must be one of"):
        _fit(tx, num_epochs=1, best_mode="up")
    with pytest.raises(ValueError, match="`patience` needs an `eval_fn`"):
        _fit(tx, num_epochs=1, patience=3)
    with pytest.raises(TypeError, match="must have a `step` field"):
        fit(
            _init(tx).params,
            _make_step(tx),
            _make_batches(X, Y),
            num_epochs=1,
            steps_per_epoch=SPE,
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match=r"`batches_fn\(0, 0\)` ran out after 6 batches"):
        _fit(tx, num_epochs=1, steps_per_epoch=SPE + 1)
    no_loss = jax.jit(lambda s, b, k: (s._replace(step=s.step + 1), {"mse": jnp.float32(0)}))
    with pytest.raises(ValueError, match=r"must hold 'loss' .*got \['mse'\]"):
        _fit(tx, step_fn=no_loss, num_epochs=1)
    with pytest.raises(ValueError, match=r"`eval_fn` returned no 'accuracy'.*\['loss'\]"):
        _fit(tx, num_epochs=1, eval_fn=lambda s: {"loss": 1.0})


def test_step_fn_must_count_steps(tmp_path):
    tx = SGD
    inner = _make_step(tx)
    frozen = jax.jit(lambda s, b, k: (inner(s, b, k)[0]._replace(step=s.step), {"loss": 0.0}))
    with pytest.raises(ValueError, match="must add 1 to `state.step`.*after 3 updates"):
        _fit(tx, step_fn=frozen, num_epochs=1, checkpoint_dir=tmp_path, save_every=3)
