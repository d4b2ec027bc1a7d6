"""Every bad input found in the engine review (issue 11) gets a clear error naming the argument.

Each case asserts the error type and that the message names the argument (or, for a NaN
teacher, the step and the teachers). The corrupt-checkpoint fallback is in
tests/test_checkpoint.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtkd_jax as mk
from mtkd_jax import weighting
from mtkd_jax.training.batch import check_batch

K, B, D, C = 3, 8, 4, 5
KEY = jax.random.key(0)
TX = optax.sgd(0.1)


def _linear(p, x):
    return x @ p


def _teachers(tp, x):
    return jnp.stack([x @ w for w in tp])


def _problem(rng):
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    tp = tuple(jnp.asarray(rng.normal(size=(D, C)), jnp.float32) for _ in range(K))
    return {"x": x, "y": y}, tp, mk.init_train_state(jnp.zeros((D, C)), TX)


# 1. Static lambdas through get_weighting inside a jitted step.
def test_static_weighting_under_jit_works_and_checks_its_lambdas(rng):
    batch, tp, state = _problem(rng)
    fn = weighting.get_weighting("static", lambdas=jnp.array([1.0, 2.0, 1.0]))
    step = jax.jit(mk.make_distill_step(_linear, _teachers, TX, weighting=fn))
    _, m = step(state, batch, KEY, teacher_params=tp)
    np.testing.assert_allclose(m["teacher_weights"], [0.25, 0.5, 0.25], rtol=1e-6)
    bad = weighting.get_weighting("static", lambdas=jnp.array([1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match=r"`lambdas` must be non-negative"):
        jax.jit(mk.make_distill_step(_linear, _teachers, TX, weighting=bad))(
            state, batch, KEY, teacher_params=tp)


# 2. Labels out of range where the README's pipeline runs: fit, data_parallel_step, evaluate.
@pytest.mark.parametrize("label", [-1, C], ids=["minus_one", "num_classes"])
def test_labels_out_of_range_are_refused_by_fit(rng, label):
    batch, tp, state = _problem(rng)
    batch["y"][3] = label
    step = jax.jit(mk.make_distill_step(_linear, _teachers, TX))
    with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, 5\)"):
        mk.fit(state, lambda s, b, k: step(s, b, k, teacher_params=tp), lambda e, s: [batch],
               num_epochs=1, steps_per_epoch=1, key=KEY, num_classes=C, progress=False)


@pytest.mark.parametrize("label", [-1, C], ids=["minus_one", "num_classes"])
def test_labels_out_of_range_are_refused_by_data_parallel_step(rng, label):
    batch, tp, state = _problem(rng)
    batch["y"][0] = label
    step = mk.data_parallel_step(mk.make_distill_step(_linear, _teachers, TX), mk.make_mesh(),
                                 num_classes=C)
    with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, 5\)"):
        step(state, batch, KEY, teacher_params=tp)
    if label < 0:  # negative labels are refused even without num_classes
        plain = mk.data_parallel_step(mk.make_distill_step(_linear, _teachers, TX),
                                      mk.make_mesh())
        with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, C\)"):
            plain(state, batch, KEY, teacher_params=tp)


@pytest.mark.parametrize("label", [-1, C], ids=["minus_one", "num_classes"])
def test_labels_out_of_range_are_refused_by_evaluate(rng, label):
    batch, tp, _ = _problem(rng)
    batch["y"][1] = label
    ev = mk.make_eval_step(_linear, _teachers)
    with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, 5\)"):
        mk.evaluate(ev, jnp.zeros((D, C)), [batch], teacher_params=tp)


# 3. Concrete fusion weights that are not a distribution.
@pytest.mark.parametrize(
    "weights, match",
    [
        ([0.5, -0.2, 0.7], r"`weights` must be non-negative"),
        ([0.5, np.nan, 0.5], r"`weights` must be finite"),
        ([0.0, 0.0, 0.0], r"`weights` must sum to 1"),
        ([1.0, 1.0, 1.0], r"`weights` must sum to 1"),
    ],
    ids=["negative", "nan", "all_zero", "unnormalised"],
)
def test_fuse_targets_refuses_bad_concrete_weights(weights, match):
    probs = np.full((K, 2, C), 1.0 / C, np.float32)
    with pytest.raises(ValueError, match=match):
        mk.fuse_targets(probs, np.asarray(weights, np.float32))


# 4. An empty batch.
def test_empty_batch_is_refused_not_a_zero_loss_step(rng):
    batch, tp, state = _problem(rng)
    empty = {k: v[:0] for k, v in batch.items()}
    step = jax.jit(mk.make_distill_step(_linear, _teachers, TX))
    with pytest.raises(ValueError, match=r"`batch\['x'\]` is empty"):
        step(state, empty, KEY, teacher_params=tp)
    with pytest.raises(ValueError, match=r"`batch\['x'\]` is empty"):
        jax.jit(mk.make_supervised_step(_linear, TX))(state, empty, KEY)
    with pytest.raises(ValueError, match=r"`batch\['x'\]` is empty"):
        mk.training.batch.check_batch(empty)


# 5. An infinite (or NaN) temperature.
@pytest.mark.parametrize("temperature", [np.inf, np.nan, 0.0], ids=["inf", "nan", "zero"])
def test_temperature_must_be_finite_and_positive(temperature):
    z = np.zeros((2, C), np.float32)
    t = np.full((2, C), 1.0 / C, np.float32)
    match = r"`temperature` must be a finite number > 0"
    for call in (
        lambda: mk.softmax_t(z, temperature=temperature),
        lambda: mk.soft_kl(z, t, temperature=temperature),
        lambda: mk.distill_targets(z[None], temperature=temperature),
        lambda: mk.make_distill_step(_linear, None, TX, temperature=temperature),
    ):
        with pytest.raises(ValueError, match=match):
            call()


# 6. NaN teacher logits: the loss shows it at that step, and fit says it was the teachers.
def test_soft_kl_value_shows_a_nan_target():
    z = np.zeros((1, C), np.float32)
    t = np.array([[0.5, np.nan, 0.5, 0.0, 0.0]], np.float32)
    assert np.isnan(mk.soft_kl(z, t)[0])  # before, the zero-mass rule hid it (value 0.405)
    assert np.isnan(jax.jit(mk.soft_kl)(z, t)[0])


def test_nan_teachers_are_blamed_at_the_step_they_happen(rng):
    batch, tp, state = _problem(rng)
    bad_step = 2
    step = jax.jit(mk.make_distill_step(_linear, _teachers, TX))

    def step_fn(s, b, k):
        # Teachers that break at update 2: their params turn NaN.
        broken = jax.tree.map(lambda w: jnp.where(s.step == bad_step, jnp.nan, w), tp)
        return step(s, b, k, teacher_params=broken)

    with pytest.raises(mk.NonFiniteLossError, match=rf"at step {bad_step} .*the teachers' logits "
                                                    r"were NaN/inf") as info:
        mk.fit(state, step_fn, lambda e, s: [batch] * (4 - s), num_epochs=1, steps_per_epoch=4,
               key=KEY, check_every=1, progress=False)
    assert info.value.step == bad_step


def test_nan_cached_teacher_logits_are_refused_on_the_host(rng):
    batch, _, state = _problem(rng)
    tl = rng.normal(size=(K, B, C)).astype(np.float32)
    tl[1, 2, 3] = np.nan
    step = mk.data_parallel_step(mk.make_distill_step(_linear, None, TX), mk.make_mesh())
    with pytest.raises(ValueError, match=r"`batch\['teacher_logits'\]` holds 1 NaN/inf"):
        step(state, {**batch, "teacher_logits": tl}, KEY)


def test_teacher_logits_of_the_wrong_batch_size_are_named(rng):
    batch, _, state = _problem(rng)
    tl = rng.normal(size=(K, B + 1, C)).astype(np.float32)
    step = jax.jit(mk.make_distill_step(_linear, None, TX))
    with pytest.raises(ValueError, match=rf"`batch\['teacher_logits'\]` must have shape "
                                         rf"\[K, B, C\] with B={B} \(the batch size of 'x'\)"):
        step(state, {**batch, "teacher_logits": tl}, KEY)
    online = jax.jit(mk.make_distill_step(_linear, lambda tp, x: tp[:, 1:], TX))
    with pytest.raises(ValueError, match=rf"teacher logits must have shape \[K, B, C\] with "
                                         rf"B={B} \(the batch size of 'x'\), got "
                                         rf"\({K}, {B - 1}, {C}\)"):
        online(state, batch, KEY, teacher_params=jnp.asarray(tl[:, :B]))


# 7. A step with online teachers called without their params.
def test_missing_teacher_params_is_named(rng):
    batch, _, state = _problem(rng)
    stacked = mk.make_stacked_apply(lambda w, x: x @ w, runner="vmap")
    for teacher_apply in (_teachers, stacked):
        step = jax.jit(mk.make_distill_step(_linear, teacher_apply, TX))
        with pytest.raises(ValueError, match=r"`teacher_params` is needed"):
            step(state, batch, KEY)
    with pytest.raises(ValueError, match=r"`teacher_params`"):
        stacked(None, batch["x"])
    with pytest.raises(ValueError, match=r"`teacher_params` is needed"):
        jax.jit(mk.make_eval_step(_linear, _teachers))(jnp.zeros((D, C)), batch)


# Issue 22: bad inputs that still passed or confused.
def test_a_step_called_eagerly_checks_its_labels(rng):
    """Concrete labels are checked on the host wherever they are (C from the logits)."""
    batch, tp, state = _problem(rng)
    batch["y"][3] = C
    match = r"`batch\['y'\]` labels must be in \[0, 5\)"
    with pytest.raises(ValueError, match=match):
        mk.make_distill_step(_linear, _teachers, TX)(state, batch, KEY, teacher_params=tp)
    with pytest.raises(ValueError, match=match):
        mk.make_supervised_step(_linear, TX)(state, batch, KEY)


def test_fit_without_num_classes_names_labels_out_of_range(rng):
    """A data-parallel step and no `num_classes`: the step reports where its labels fall
    outside its output's classes, and `fit` says so (before: "non-finite loss")."""
    batch, tp, state = _problem(rng)
    batch["y"][3] = C
    step = mk.data_parallel_step(mk.make_distill_step(_linear, _teachers, TX, alpha=0.5),
                                 mk.make_mesh())
    with pytest.raises(ValueError, match=r"labels outside \[0, C\).*step 0.*num_classes"):
        mk.fit(state, lambda s, b, k: step(s, b, k, teacher_params=tp),
               lambda e, s: [batch] * (3 - s), num_epochs=1, steps_per_epoch=3, key=KEY,
               progress=False)


def _sequence(rng, b=4, length=9, v=C):
    x = rng.normal(size=(b, length, D)).astype(np.float32)
    y = rng.integers(0, v, size=(b, length)).astype(np.int32)
    return {"x": x, "y": y, "mask": np.ones((b, length), np.float32)}


def test_fit_without_num_classes_refuses_an_all_padding_batch(rng):
    batch = _sequence(rng)
    batch["mask"][:] = 0
    step = jax.jit(mk.make_supervised_step(_linear, TX))
    with pytest.raises(ValueError, match=r"`batch\['mask'\]`.*is 0 everywhere"):
        mk.fit(mk.init_train_state(jnp.zeros((D, C)), TX), step, lambda e, s: [batch],
               num_epochs=1, steps_per_epoch=1, key=KEY, progress=False)


def test_a_sequence_mask_must_be_zero_or_one(rng):
    """Packed segment ids (0/1/2) are not a padding mask (they were used as loss weights)."""
    batch = _sequence(rng)
    batch["mask"][:, 3:6] = 2.0
    state = mk.init_train_state(jnp.zeros((D, C)), TX)
    match = r"`batch\['mask'\]` must hold 0 \(padding\) or 1 \(token\).*\[1.0, 2.0\]"
    with pytest.raises(ValueError, match=match):
        check_batch(batch)
    with pytest.raises(ValueError, match=match):
        mk.make_supervised_step(_linear, TX)(state, batch, KEY)
    step = mk.data_parallel_step(mk.make_supervised_step(_linear, TX), mk.make_mesh())
    with pytest.raises(ValueError, match=match):
        step(state, {k: np.concatenate([v, v]) for k, v in batch.items()}, KEY)
    check_batch({**batch, "mask": batch["mask"] > 0})  # booleans are fine


def test_a_mask_of_the_wrong_length_is_blamed_not_the_labels(rng):
    batch = _sequence(rng)
    batch["mask"] = np.ones((4, 10), np.float32)
    state = mk.init_train_state(jnp.zeros((D, C)), TX)
    with pytest.raises(ValueError, match=r"`batch\['mask'\]` has shape \(4, 10\) but "
                                         r"`batch\['y'\]` \(4, 9\)"):
        jax.jit(mk.make_supervised_step(_linear, TX))(state, batch, KEY)
