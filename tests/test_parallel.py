"""Data parallelism on the 8 fake CPU devices that conftest sets up."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mtkd_jax.core.reduce import global_mean
from mtkd_jax.parallel import (
    data_mesh,
    data_parallel_step,
    global_batch_from_local,
    replicate,
    shard_batch,
)
from mtkd_jax.training.evaluation import make_eval_step
from mtkd_jax.training.state import init_stacked_train_state, init_train_state
from mtkd_jax.training.steps import make_codistill_step, make_distill_step

K, B, D, H, C = 3, 16, 5, 8, 4
STEPS = 4
KEY = jax.random.key(42)
TOL = dict(rtol=1e-6, atol=1e-6)


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _teachers(tp, x):
    """K linear teachers stacked on a leading axis, run with vmap -> [K, B, C]."""
    return jax.vmap(lambda w: x @ w)(tp)


@pytest.fixture(scope="module")
def problem():
    r = np.random.default_rng(0)
    shapes = {"w1": (D, H), "b1": (H,), "w2": (H, C), "b2": (C,)}
    params = {k: jnp.asarray(r.normal(size=s) * 0.5, jnp.float32) for k, s in shapes.items()}
    tp = jnp.asarray(r.normal(size=(K, D, C)), jnp.float32)
    batches = []
    for _ in range(STEPS):
        x = r.normal(size=(B, D)).astype(np.float32)
        # Labeled examples fall unevenly across devices, so a per-device mean would be wrong.
        mask = (r.random(B) < 0.6).astype(np.float32)
        mask[0] = 1.0
        y = np.where(mask > 0, r.integers(0, C, size=B), -1).astype(np.int32)
        batches.append({"x": x, "y": y, "label_mask": mask, "index": np.arange(B)})
    return params, tp, batches


def _tx():
    return optax.sgd(0.3, momentum=0.9)


def _step(axis_name=None):
    return make_distill_step(
        _mlp, _teachers, _tx(), weighting="confidence", temperature=2.0, alpha=0.4,
        axis_name=axis_name,
    )


def _run(step, params, tp, batches):
    state = init_train_state(params, _tx())
    losses = []
    for batch in batches:
        state, m = step(state, batch, KEY, teacher_params=tp)
        losses.append(m)
    return state, losses


def _assert_same(run_a, run_b):
    (sa, ma), (sb, mb) = run_a, run_b
    for a, b in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    for a, b in zip(ma, mb, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), err_msg=k, **TOL)


@pytest.fixture(scope="module")
def reference(problem):
    """Single-device jit of the global-batch step."""
    return _run(jax.jit(_step()), *problem)


def test_eight_devices_equal_one(problem, reference, num_devices):
    assert num_devices == 8
    one = data_parallel_step(_step(), data_mesh(jax.devices()[:1]))
    eight = data_parallel_step(_step(), data_mesh())
    run8 = _run(eight, *problem)
    _assert_same(_run(one, *problem), reference)
    _assert_same(run8, reference)
    state = run8[0]
    assert int(state.step) == STEPS
    assert state.params["w1"].sharding.spec == P()  # replicated out, ready for the next step
    assert len(state.params["w1"].sharding.device_set) == 8


def test_shard_map_and_pmap_equal_mesh_step(problem, reference):
    """The axis_name step in shard_map (replicated params, check_vma) and in a user's pmap."""
    sm = data_parallel_step(_step("data"), data_mesh(), mode="shard_map")
    _assert_same(_run(sm, *problem), reference)

    params, tp, batches = problem
    pstep = jax.pmap(
        lambda s, b, k, t: _step("data")(s, b, k, teacher_params=t),
        axis_name="data",
        in_axes=(None, 0, None, None),
    )
    state = init_train_state(params, _tx())
    ms = []
    for batch in batches:
        local = {k: v.reshape(8, B // 8, *v.shape[1:]) for k, v in batch.items()}
        state, m = pstep(state, local, KEY, tp)
        state, m = jax.tree.map(lambda a: a[0], (state, m))  # identical on every device
        ms.append(m)
    _assert_same((state, ms), reference)


def test_precomputed_teacher_logits_split_on_batch_axis(problem, reference):
    """The teacher-cache path: batch['teacher_logits'] [K, B, C] is split on its B axis."""
    params, tp, batches = problem
    cached = [{**b, "teacher_logits": np.asarray(_teachers(tp, b["x"]))} for b in batches]
    step = make_distill_step(
        _mlp, None, _tx(), weighting="confidence", temperature=2.0, alpha=0.4
    )
    run = _run(data_parallel_step(step, data_mesh()), params, None, cached)
    _assert_same(run, reference)


def test_codistill_shard_map_equals_one_device(problem):
    params, _, batches = problem
    stacked = jax.tree.map(lambda a: jnp.stack([a, -a, 0.5 * a]), params)
    tx = _tx()  # not Adam: its scale invariance would hide a gradient summed over devices

    def run(step):
        state = init_stacked_train_state(stacked, tx)
        ms = []
        for batch in batches[:2]:
            state, m = step(state, batch, KEY)
            ms.append(m)
        return state, ms

    kw = dict(soft_loss="mse", alpha=0.5, weighting="entropy")
    ref = run(jax.jit(make_codistill_step(_mlp, tx, **kw)))
    sm = make_codistill_step(_mlp, tx, axis_name="data", **kw)
    _assert_same(run(data_parallel_step(sm, data_mesh(), mode="shard_map")), ref)


def test_no_retracing(problem):
    params, tp, batches = problem
    counted = chex.assert_max_traces(_step(), n=1)
    step = data_parallel_step(counted, data_mesh())
    state = init_train_state(params, _tx())
    for batch in batches:  # fresh host arrays every step
        state, _ = step(state, batch, KEY, teacher_params=tp)
    chex.clear_trace_counter()


def test_indivisible_batch_is_an_error(problem):
    params, tp, batches = problem
    step = data_parallel_step(_step(), data_mesh())
    small = {k: v[:12] for k, v in batches[0].items()}
    with pytest.raises(ValueError, match="Global batch size 12 does not divide over 8 devices"):
        step(init_train_state(params, _tx()), small, KEY, teacher_params=tp)
    with pytest.raises(ValueError, match="Global batch size 12 does not divide over 8 devices"):
        shard_batch(small, data_mesh())
    with pytest.raises(ValueError, match="Local .* batch size 12 does not divide over 8"):
        global_batch_from_local(small, data_mesh())


def test_global_batch_from_local_equals_shard_batch(problem):
    mesh = data_mesh()
    batch = {**problem[2][0], "teacher_logits": np.ones((K, B, C), np.float32)}
    a, b = shard_batch(batch, mesh), global_batch_from_local(batch, mesh)
    for k in batch:
        assert a[k].sharding.is_equivalent_to(b[k].sharding, a[k].ndim), k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert a["teacher_logits"].sharding.spec == P(None, "data")
    assert a["x"].addressable_shards[0].data.shape == (B // 8, D)


def test_replicate_and_mesh():
    mesh = data_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    tree = replicate({"w": jnp.arange(3.0)}, mesh)
    assert tree["w"].sharding.spec == P() and len(tree["w"].addressable_shards) == 8
    with pytest.raises(ValueError, match="at least one device"):
        data_mesh([])


def test_global_mean_is_pmeanable(rng):
    """pmean of the per-device value (and its gradient) is the global weighted mean."""
    v = rng.normal(size=(16, 3)).astype(np.float32)
    w = (rng.random(16) < 0.5).astype(np.float32)
    w[:2] = 1.0

    def per_device(v, w):
        return jax.lax.pmean(global_mean(v, w, axis_name="i"), "i")

    got = jax.pmap(per_device, axis_name="i")(v.reshape(8, 2, 3), w.reshape(8, 2))[0]
    np.testing.assert_allclose(np.asarray(got), (w @ v) / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(global_mean(v, w)), (w @ v) / w.sum(), rtol=1e-6
    )


def test_mode_mismatch_errors(problem):
    """What is averaged where is an argument: a step built for the other mode is refused when
    first traced, with a message that says what to change (no attribute is read off it)."""
    params, tp, batches = problem
    state = init_train_state(params, _tx())
    cases = [
        (_step("data"), "jit", r"mode='jit' and the step disagree.*axis_name=None"),
        (_step(), "shard_map", r"mode='shard_map' and the step disagree.*axis_name='data'"),
        (_step("batch"), "shard_map", r"mode='shard_map' and the step disagree"),
    ]
    for step, mode, match in cases:
        with pytest.raises(ValueError, match=match):
            data_parallel_step(step, data_mesh(), mode=mode)(
                state, batches[0], KEY, teacher_params=tp)
    with pytest.raises(ValueError, match="`mode` must be 'jit' or 'shard_map'"):
        data_parallel_step(_step(), data_mesh(), mode="pmap")


def test_host_checks_before_the_compiled_step(problem):
    params, tp, batches = problem
    step = data_parallel_step(_step(), data_mesh(), num_classes=C)
    state = init_train_state(params, _tx())
    bad = {**batches[0], "y": np.where(batches[0]["label_mask"] > 0, C, -1).astype(np.int32)}
    with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, 4\)"):
        step(state, bad, KEY, teacher_params=tp)
    empty = {k: v[:0] for k, v in batches[0].items()}
    with pytest.raises(ValueError, match=r"`batch\['x'\]` is empty"):
        step(state, empty, KEY, teacher_params=tp)


def test_batch_axes_is_an_argument(problem, reference):
    """Entries whose batch axis is not the first are named by the caller."""
    params, tp, batches = problem
    renamed = [{**b, "soft": np.asarray(_teachers(tp, b["x"]))} for b in batches]
    base = make_distill_step(_mlp, None, _tx(), weighting="confidence", temperature=2.0,
                             alpha=0.4)

    def step(state, batch, key):
        batch = dict(batch)
        return base(state, {**batch, "teacher_logits": batch.pop("soft")}, key)

    par = data_parallel_step(step, data_mesh(), batch_axes={"soft": 1})
    _assert_same(_run(lambda s, b, k, teacher_params: par(s, b, k), params, tp, renamed),
                 reference)
    with pytest.raises(ValueError, match="Batch entries disagree on the batch size"):
        data_parallel_step(step, data_mesh())(init_train_state(params, _tx()), renamed[0], KEY)


def test_eval_stats_psum_over_devices(problem):
    """Per-device eval statistics summed with axis_name equal the one-device statistics."""
    params, tp, batches = problem
    batch = {k: v for k, v in batches[0].items() if k != "index"}
    whole = jax.jit(make_eval_step(_mlp, _teachers))(params, batch, teacher_params=tp)
    per_device = jax.pmap(
        lambda p, b, t: make_eval_step(_mlp, _teachers, axis_name="data")(p, b, teacher_params=t),
        axis_name="data",
        in_axes=(None, 0, None),
    )
    local = {k: v.reshape(8, B // 8, *v.shape[1:]) for k, v in batch.items()}
    summed = jax.tree.map(lambda a: a[0], per_device(params, local, tp))
    assert sorted(summed) == ["ensemble", "student", "teachers"]
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert int(summed["student"].n) == int(batch["label_mask"].sum())


def test_teachers_passed_at_call_time_are_replicated_arguments(problem):
    """`teacher_params=` at call time is an argument of the program (placed once, `P()`),
    not a constant baked into it: new teacher params need no recompile."""
    params, tp, batches = problem
    counted = chex.assert_max_traces(_step(), n=1)
    step = data_parallel_step(counted, data_mesh())
    state = init_train_state(params, _tx())
    state, _ = step(state, batches[0], KEY, teacher_params=tp)
    state, _ = step(state, batches[1], KEY, teacher_params=2.0 * tp)  # other values, no retrace
    chex.clear_trace_counter()
