"""Tests for mtkd_jax.training.checkpoint: round trips, latest vs best, fingerprints, atomicity,
unreadable checkpoints."""

import os
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax.training.checkpoint import (
    Checkpointer,
    Restored,
    UnreadableCheckpointError,
    UnreadableCheckpointWarning,
    params_fingerprint,
)
from mtkd_jax.training.fit import fit


class State(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


def _params(rng, scale=1.0):
    return {
        "dense": {"w": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32)},
        "b": jnp.asarray(scale * rng.normal(size=(3,)), jnp.float32),
    }


def _state(rng, tx, step=0):
    params = _params(rng)
    opt_state = tx.init(params)
    # One real update, so moments and counters are non-trivial.
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    # Jitted: one compilation instead of one per eager optax op (seconds on this CPU).
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    return State(jnp.asarray(step, jnp.int32), optax.apply_updates(params, updates), opt_state)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.adam(1e-2),
        lambda: optax.sgd(0.1, momentum=0.9),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    ],
    ids=["adam", "sgd_momentum", "chain_clip_adamw"],
)
def test_round_trip_keeps_optax_state_types(tmp_path, rng, make_tx):
    tx = make_tx()
    state = _state(rng, tx, step=7)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, metrics={"loss": jnp.float32(0.25)}, extra={"note": "x"})
        ckpt.wait()
        # A target with other values but the same structure: the values must come from disk.
        target = _state(np.random.default_rng(123), tx, step=0)
        restored = ckpt.restore(target)
    assert isinstance(restored, Restored)
    assert restored.step == 7
    assert type(restored.state) is State
    assert type(restored.state.opt_state) is type(state.opt_state)
    # The treedef holds the NamedTuple classes (ScaleByAdamState, TraceState, ...).
    _assert_trees_equal(restored.state, state)
    assert restored.metadata["metrics"] == {"loss": 0.25}
    assert restored.metadata["extra"] == {"note": "x"}
    assert restored.metadata["step"] == 7
    # The restored optimizer state is usable by the optimizer.
    grads = jax.tree.map(jnp.ones_like, restored.state.params)
    update = jax.jit(tx.update)
    want, _ = update(grads, state.opt_state, state.params)
    got, _ = update(grads, restored.state.opt_state, restored.state.params)
    _assert_trees_equal(got, want)


def test_restore_accepts_abstract_target(tmp_path, rng):
    tx = optax.adam(1e-3)
    state = _state(rng, tx, step=3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
        ckpt.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = ckpt.restore(abstract)
    _assert_trees_equal(restored.state, state)


def test_latest_and_best_are_kept_apart(tmp_path, rng):
    tx = optax.sgd(0.1)
    accuracy = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8, 6: 0.4}
    states = {s: _state(rng, tx, step=s) for s in accuracy}
    best_so_far = -np.inf
    with Checkpointer(tmp_path, keep=2, best_metric="accuracy") as ckpt:
        for s, acc in accuracy.items():
            if acc > best_so_far:
                best_so_far = acc
                ckpt.save_best(s, states[s], metrics={"accuracy": acc})
            ckpt.save(s, states[s], metrics={"accuracy": acc})
            ckpt.wait()
            # The newest checkpoint is never the one deleted.
            assert ckpt.latest_step() == s
            assert ckpt.all_steps() == list(range(max(1, s - 1), s + 1))
        # A worse candidate offered as best is dropped, the better one stays.
        ckpt.save_best(6, states[6], metrics={"accuracy": accuracy[6]})
        assert ckpt.best_step() == 2  # ranked by metric, even while step 6 is in flight
        ckpt.wait()
        assert ckpt.all_steps("best") == [2]
        assert ckpt.best_step() == 2
        best = ckpt.restore(states[1], which="best")
        latest = ckpt.restore(states[1])
        older = ckpt.restore(states[1], step=5)
    _assert_trees_equal(best.state, states[2])
    assert best.metadata["metrics"] == {"accuracy": 0.9}
    _assert_trees_equal(latest.state, states[6])
    _assert_trees_equal(older.state, states[5])
    assert sorted(os.listdir(tmp_path)) == ["best", "latest"]


def test_best_mode_min(tmp_path, rng):
    tx = optax.sgd(0.1)
    states = [_state(rng, tx, step=s) for s in range(3)]
    with Checkpointer(tmp_path, best_metric="loss", best_mode="min") as ckpt:
        for s, loss in enumerate([0.5, 0.2, 0.3]):
            ckpt.save_best(s, states[s], metrics={"loss": loss})
        ckpt.wait()
        assert ckpt.all_steps("best") == [1]


def test_discard_best_after(tmp_path, rng):
    tx = optax.sgd(0.1)
    with Checkpointer(tmp_path, best_metric="accuracy") as ckpt:
        ckpt.save_best(4, _state(rng, tx, step=4), metrics={"accuracy": 0.5})
        ckpt.wait()
        assert ckpt.discard_best_after(4) == []
        assert ckpt.discard_best_after(3) == [4]
        assert ckpt.best_step() is None


def test_nothing_saved(tmp_path, rng):
    state = _state(rng, optax.sgd(0.1))
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.restore(state) is None
        assert ckpt.restore(state, which="best") is None
        assert ckpt.metadata() is None
        assert ckpt.latest_step() is None
        assert ckpt.best_step() is None
        assert ckpt.all_steps() == []


def test_fingerprint_is_saved_and_mismatch_refused(tmp_path, rng):
    tx = optax.sgd(0.1)
    state = _state(rng, tx, step=2)
    teachers = _params(rng)
    fp = params_fingerprint(teachers, names=["a", "b"])
    with Checkpointer(tmp_path, fingerprint=fp) as ckpt:
        ckpt.save(2, state)
        ckpt.wait()
        assert ckpt.metadata()["fingerprint"] == fp
    with Checkpointer(tmp_path, fingerprint=fp) as ckpt:
        _assert_trees_equal(ckpt.restore(state).state, state)

    other_values = jax.tree.map(lambda x: x + 1, teachers)
    other_shape = {**teachers, "b": jnp.zeros(4, jnp.float32)}
    cases = [
        (params_fingerprint(teachers, names=["a", "c"]), r"names \['a', 'b'\] != \['a', 'c'\]"),
        (params_fingerprint(other_values, names=["a", "b"]), r"content sha256"),
        (
            params_fingerprint(other_shape, names=["a", "b"]),
            r"\['b'\]: float32\[3\] -> float32\[4\]",
        ),
        (None, "has a teacher fingerprint but none was given"),
    ]
    for other, message in cases:
        with Checkpointer(tmp_path, fingerprint=other) as ckpt:
            with pytest.raises(ValueError, match="different teachers") as info:
                ckpt.restore(state)
            assert info.match(message)
            # The check can be waived, e.g. to evaluate a student alone.
            assert ckpt.restore(state, check_fingerprint=False).step == 2


def test_checkpoint_without_fingerprint_refuses_one(tmp_path, rng):
    state = _state(rng, optax.sgd(0.1))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, state)
    fp = params_fingerprint(_params(rng))
    with Checkpointer(tmp_path, fingerprint=fp) as ckpt:
        with pytest.raises(ValueError, match="has no teacher fingerprint but one was given"):
            ckpt.restore(state)


def test_params_fingerprint_properties(rng):
    tree = _params(rng)
    fp = params_fingerprint(tree)
    assert fp == params_fingerprint(jax.tree.map(jnp.array, tree))
    assert fp["names"] is None
    assert fp["leaves"] == {"['b']": "float32[3]", "['dense']['w']": "float32[4, 3]"}
    changed = [
        {**tree, "b": tree["b"].at[0].add(1e-6)},
        {**tree, "b": tree["b"].astype(jnp.bfloat16)},
        {**tree, "b": tree["b"][None]},
        {"c": tree["b"], "dense": tree["dense"]},
    ]
    hashes = {params_fingerprint(t)["sha256"] for t in changed} | {fp["sha256"]}
    assert len(hashes) == len(changed) + 1
    with pytest.raises(TypeError, match="`names` must be a sequence of str"):
        params_fingerprint(tree, names="ab")


def test_bad_arguments(tmp_path, rng):
    state = _state(rng, optax.sgd(0.1))
    with pytest.raises(ValueError, match="`keep` must be an int >= 1"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="`best_mode` must be one of"):
        Checkpointer(tmp_path, best_mode="best")
    with pytest.raises(TypeError, match="`fingerprint` must be a dict"):
        Checkpointer(tmp_path, fingerprint="abc")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="needs the Checkpointer's `best_metric`"):
            ckpt.save_best(1, state, metrics={"accuracy": 1.0})
        with pytest.raises(ValueError, match="`which` must be one of"):
            ckpt.restore(state, which="oldest")
        with pytest.raises(ValueError, match="`step` must be an int >= 0"):
            ckpt.save(-1, state)
        ckpt.save(1, state)
        ckpt.wait()
        with pytest.raises(ValueError, match=r"no checkpoint at step 5 .* steps there: \[1\]"):
            ckpt.restore(state, step=5)
        wrong = state._replace(params={**state.params, "b": jnp.zeros(5)})
        with pytest.raises(ValueError, match=r"b has shape \(3,\), the target \(5,\)"):
            ckpt.restore(wrong)
        extra = state._replace(params={**state.params, "c": jnp.zeros(3)})
        with pytest.raises(ValueError, match=r"not in the checkpoint: \['params.c'\]"):
            ckpt.restore(extra)
    with Checkpointer(tmp_path / "b", best_metric="accuracy") as ckpt:
        with pytest.raises(ValueError, match="has no 'accuracy'"):
            ckpt.save_best(1, state, metrics={"loss": 1.0})
        with pytest.raises(ValueError, match="must be finite"):
            ckpt.save_best(1, state, metrics={"accuracy": float("nan")})


def test_half_written_checkpoint_is_ignored(tmp_path, rng):
    """An interrupted save leaves `<step>.orbax-checkpoint-tmp`, which restore never picks."""
    state = _state(rng, optax.sgd(0.1), step=1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
    partial = tmp_path / "latest" / "2.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "garbage").write_bytes(b"\x00" * 10)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        _assert_trees_equal(ckpt.restore(state).state, state)
        # And a new save of the same step goes through.
        ckpt.save(2, state._replace(step=jnp.asarray(2, jnp.int32)))
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]


_KILL_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from mtkd_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(1, {"w": jnp.full((1024, 1024), 1.0)})
    ckpt.wait()
    ckpt.save(2, {"w": jnp.full((2048, 2048), 2.0)})  # returns while the write goes on
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_during_async_save_keeps_a_whole_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_SAVE, str(tmp_path)],
        capture_output=True,
        timeout=120,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    interrupted = (tmp_path / "latest" / "2.orbax-checkpoint-tmp").exists()
    with Checkpointer(tmp_path) as ckpt:
        step = ckpt.latest_step()
        # The kill lands before step 2's write starts, during it (its temporary folder is
        # left: step 1 must be the latest) or after it; whichever step is the latest must
        # restore whole, with its own values.
        assert step in (1, 2)
        if interrupted:
            assert step == 1
        shape = (1024, 1024) if step == 1 else (2048, 2048)
        restored = ckpt.restore({"w": jnp.zeros(shape)})
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full(shape, float(step)))


# Unreadable checkpoints. Every test writes its own checkpoints in a fresh tmp_path.


def _large_state(rng, step, shape=(96, 96)):
    # Random float32 does not compress: the largest file under state/ holds this array's data.
    params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32), "b": jnp.zeros(3)}
    return State(jnp.asarray(step, jnp.int32), params, optax.sgd(0.1, momentum=0.9).init(params))


def _save_steps(directory, rng, steps=(1, 2, 3), **kwargs):
    states = {s: _large_state(rng, s) for s in steps}
    with Checkpointer(directory, keep=len(steps), **kwargs) as ckpt:
        for s, state in states.items():
            ckpt.save(s, state)
    return states


def _largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    assert largest.parent.name == "d", largest  # an OCDBT data file, not metadata
    return largest


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


_CORRUPTIONS = {
    "truncated_array_file": lambda d: _truncate(_largest_array_file(d)),
    "deleted_array_file": lambda d: _largest_array_file(d).unlink(),
    "garbage_meta_json": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "meta_json_of_another_shape": lambda d: (d / "meta" / "metadata").write_text("[1, 2]"),
    "deleted_meta_json": lambda d: (d / "meta" / "metadata").unlink(),
    "truncated_state_metadata": lambda d: _truncate(d / "state" / "_METADATA"),
    "deleted_state_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
}


@pytest.mark.parametrize("corrupt", list(_CORRUPTIONS.values()), ids=list(_CORRUPTIONS))
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, rng, corrupt):
    states = _save_steps(tmp_path, rng)
    corrupt(tmp_path / "latest" / "3")
    skipped = rf"{tmp_path}/latest: step 3: .*Using step 2 instead"
    with Checkpointer(tmp_path, keep=3) as ckpt:
        with pytest.warns(UnreadableCheckpointWarning, match=skipped):
            restored = ckpt.restore(states[1])
        assert restored.step == 2 and restored.metadata["step"] == 2
        _assert_trees_equal(restored.state, states[2])
        # The unreadable directory stays (and is listed) until a save of its step replaces it.
        assert ckpt.all_steps() == [1, 2, 3] and ckpt.latest_step() == 3
        again = _large_state(rng, 3)
        ckpt.save(3, again)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3]
        _assert_trees_equal(ckpt.restore(states[1]).state, again)


def test_metadata_falls_back_too(tmp_path, rng):
    _save_steps(tmp_path, rng)
    (tmp_path / "latest" / "3" / "meta" / "metadata").write_text("{not json")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UnreadableCheckpointWarning, match=r"step 3: its `meta`: JSONDecode"):
            assert ckpt.metadata()["step"] == 2
        # Only the meta was read: a broken array file of step 3 would not be noticed here.
        assert ckpt.metadata(step=2)["step"] == 2


@pytest.mark.parametrize("content", ["", "[]"], ids=["truncated", "wrong_types"])
def test_broken_orbax_step_metadata_keeps_the_newest(tmp_path, rng, content):
    """orbax's `_CHECKPOINT_METADATA` (commit time, metrics) is not needed to restore."""
    states = _save_steps(tmp_path, rng)
    (tmp_path / "latest" / "3" / "_CHECKPOINT_METADATA").write_text(content)
    with Checkpointer(tmp_path, keep=3) as ckpt:
        restored = ckpt.restore(states[1])  # no warning: warnings are errors here
        assert restored.step == 3
        _assert_trees_equal(restored.state, states[3])
        ckpt.save(4, _large_state(rng, 4))
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3, 4]


def test_every_checkpoint_unreadable_raises_naming_each_step(tmp_path, rng):
    states = _save_steps(tmp_path, rng)
    for step, corrupt in zip((1, 2, 3), _CORRUPTIONS.values(), strict=False):
        corrupt(tmp_path / "latest" / str(step))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UnreadableCheckpointError) as info:
            ckpt.restore(states[1])
    assert info.match(
        rf"cannot read any checkpoint in {tmp_path}/latest: step 3: its `meta`: JSONDecodeError"
        r".*; step 2: its state: ValueError: .*; step 1: its state: ValueError: OUT_OF_RANGE"
    )
    assert list(info.value.errors) == [3, 2, 1]
    assert info.value.directory == f"{tmp_path}/latest"


def test_explicit_step_or_best_of_an_unreadable_checkpoint_raises(tmp_path, rng):
    states = _save_steps(tmp_path, rng, best_metric="accuracy")
    _truncate(_largest_array_file(tmp_path / "latest" / "3"))
    with Checkpointer(tmp_path, best_metric="accuracy") as ckpt:
        with pytest.raises(
            UnreadableCheckpointError, match=r"checkpoint in .*/latest: step 3: its"
        ):
            ckpt.restore(states[1], step=3)
        _assert_trees_equal(ckpt.restore(states[1], step=2).state, states[2])
        ckpt.save_best(2, states[2], metrics={"accuracy": 0.5})
        ckpt.wait()
    (tmp_path / "best" / "2" / "meta" / "metadata").write_text("{")
    with Checkpointer(tmp_path, best_metric="accuracy") as ckpt:
        with pytest.raises(UnreadableCheckpointError, match=r"in .*/best: step 2: its `meta`"):
            ckpt.restore(states[1], which="best")
        with pytest.raises(UnreadableCheckpointError, match=r"/best: step 2: its `meta`"):
            ckpt.metadata(which="best")
        with pytest.raises(UnreadableCheckpointError, match=r"/latest: step 3: its state"):
            ckpt.restore(states[1], step=3)
    # The best manager ranks by the metrics in orbax's step metadata: it cannot do without.
    (tmp_path / "best" / "2" / "_CHECKPOINT_METADATA").write_text("[]")
    with Checkpointer(tmp_path, best_metric="accuracy") as ckpt:
        with pytest.raises(UnreadableCheckpointError, match=r"cannot open .*/best: ValueError"):
            ckpt.best_step()


def test_callers_errors_do_not_fall_back(tmp_path, rng):
    """Another target structure or teacher fingerprint is the caller's error: raised at once."""
    fp = params_fingerprint({"w": jnp.zeros(2)})
    states = _save_steps(tmp_path, rng, steps=(1, 2), fingerprint=fp)
    reshaped = _large_state(rng, 3, shape=(48, 48))
    with Checkpointer(tmp_path, keep=3, fingerprint=fp) as ckpt:
        ckpt.save(3, reshaped)
        ckpt.wait()
        # Steps 1 and 2 would fit the target; step 3 does not, and that is not skipped.
        with pytest.raises(
            ValueError, match=r"latest/3 into the given `target`: .*params.w has shape \(48, 48\)"
        ):
            ckpt.restore(states[1])
        _assert_trees_equal(ckpt.restore(reshaped).state, reshaped)
    with Checkpointer(tmp_path, fingerprint=params_fingerprint({"w": jnp.ones(2)})) as ckpt:
        with pytest.raises(ValueError, match=r"latest/3 was trained with different teachers"):
            ckpt.restore(reshaped)
    # An unreadable step 3 is skipped; the caller's error on step 2 is still raised.
    _truncate(_largest_array_file(tmp_path / "latest" / "3"))
    with Checkpointer(tmp_path, fingerprint=fp) as ckpt:
        with pytest.raises(ValueError, match=r"latest/2 into the given `target`") as info:
            ckpt.restore(reshaped)
    (note,) = info.value.__notes__
    assert note.startswith(f"Skipped before it as unreadable: {tmp_path}/latest: step 3: its state")


def test_fit_resumes_past_an_unreadable_newest_checkpoint(tmp_path, rng):
    """A resume skips the broken step 8, replays from step 4, and remakes step 8 on the way."""
    tx = optax.adam(0.05)
    x = jnp.asarray(rng.normal(size=(4, 8, 64)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(4, 8, 32)), jnp.float32)
    params = {"w": jnp.zeros((64, 32), jnp.float32)}
    init = State(jnp.asarray(0, jnp.int32), params, tx.init(params))

    @jax.jit
    def step_fn(state, batch, key):
        loss_fn = lambda p: jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = State(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        return new, {"loss": loss}

    def run(num_epochs, directory):
        batches = lambda epoch, start: ((x[i], y[i]) for i in range(start, 4))
        return fit(
            init,
            step_fn,
            batches,
            num_epochs=num_epochs,
            steps_per_epoch=4,
            key=jax.random.key(0),
            checkpoint_dir=directory,
            progress=False,
        )

    whole = run(3, tmp_path / "whole")
    run(2, tmp_path / "cut")  # checkpoints at steps 4 and 8
    _truncate(_largest_array_file(tmp_path / "cut" / "latest" / "8"))
    with pytest.warns(UnreadableCheckpointWarning, match=r"cut/latest: step 8: .*step 4 inst"):
        resumed = run(3, tmp_path / "cut")
    assert resumed.resumed_from == 4 and resumed.step == 12
    _assert_trees_equal(resumed.state, whole.state)
    assert resumed.history == whole.history
    with Checkpointer(tmp_path / "whole") as a, Checkpointer(tmp_path / "cut") as b:
        assert a.all_steps() == b.all_steps() == [8, 12]
        _assert_trees_equal(b.restore(init, step=8).state, a.restore(init, step=8).state)
