"""Sharded parameters over a 2-D ("data", "model") mesh on the 8 fake CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax.cache import build_cache_in_parallel
from mtkd_jax.parallel import (
    abstract_like,
    fsdp,
    global_batch_from_local,
    make_mesh,
    per_teacher,
    replicated,
    shard_batch,
    sharded_eval_step,
    sharded_step,
    sharded_teacher_apply,
    stacked,
    state_shardings,
    tensor_parallel,
    tree_shardings,
)
from mtkd_jax.teachers import make_stacked_apply
from mtkd_jax.training.checkpoint import Checkpointer
from mtkd_jax.training.evaluation import make_eval_step
from mtkd_jax.training.state import init_stacked_train_state, init_train_state
from mtkd_jax.training.steps import make_codistill_step, make_distill_step, make_supervised_step

K, B, D, H, TH, C = 4, 16, 8, 16, 32, 4
STEPS = 3
KEY = jax.random.key(7)
TOL = dict(rtol=1e-6, atol=1e-6)
# Teachers: weights of 256 and 128 elements per teacher are split, biases (32, 4) are not.
TEACHER_RULE = stacked(fsdp(min_size=64))
STUDENT_RULE = fsdp(min_size=64)


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _init(r, hidden, lead=()):
    shapes = {"w1": (D, hidden), "b1": (hidden,), "w2": (hidden, C), "b2": (C,)}
    return {k: jnp.asarray(r.normal(size=lead + s) * 0.5, jnp.float32) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def problem():
    r = np.random.default_rng(0)
    student = _init(r, H)
    teachers = _init(r, TH, (K,))
    batches = []
    for _ in range(STEPS + 2):
        x = r.normal(size=(B, D)).astype(np.float32)
        mask = (r.random(B) < 0.6).astype(np.float32)
        mask[0] = 1.0
        y = np.where(mask > 0, r.integers(0, C, size=B), 0).astype(np.int32)
        batches.append({"x": x, "y": y, "label_mask": mask})
    return student, teachers, batches


def _tx():
    return optax.adam(0.05)


def _distill():
    teacher_apply = make_stacked_apply(_mlp, strategy="vmap")
    return make_distill_step(_mlp, teacher_apply, _tx(), temperature=2.0, alpha=0.3)


def _run(step, state, batches, **kw):
    metrics = []
    for batch in batches:
        state, m = step(state, batch, KEY, **kw)
        metrics.append(m)
    return state, metrics


def _assert_same(run_a, run_b):
    (sa, ma), (sb, mb) = run_a, run_b
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    for a, b in zip(ma, mb, strict=True):
        for name in a:
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), **TOL)


def _on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def _reference(step, state, batches, **kw):
    """The same step jitted on one device."""
    state, kw = _on_one_device((state, kw))
    return _run(jax.jit(step), state, [_on_one_device(b) for b in batches], **kw)


@pytest.fixture(scope="module")
def reference(problem):
    """The distill run on one device: (state, metrics) after STEPS, and after STEPS + 2."""
    student, teachers, batches = problem
    state = init_train_state(student, _tx())
    step = jax.jit(_distill())
    state, kw = _on_one_device((state, {"teacher_params": teachers}))
    mid = _run(step, state, [_on_one_device(b) for b in batches[:STEPS]], **kw)
    end = _run(step, mid[0], [_on_one_device(b) for b in batches[STEPS:]], **kw)
    return mid, end, step


@pytest.fixture(scope="module")
def distill_steps(problem):
    """Sharded distill steps by (mesh shape, student rule, teacher rule), compiled once."""
    student, teachers, _ = problem
    state = init_train_state(student, _tx())
    made = {}

    def get(shape, student_rule, teacher_rule):
        key = (shape, student_rule, teacher_rule)
        if key not in made:
            mesh = make_mesh(*shape)
            s_sh = state_shardings(state, mesh, RULES[student_rule])
            t_sh = tree_shardings(teachers, mesh, RULES[teacher_rule])
            made[key] = s_sh, sharded_step(_distill(), mesh, state_shardings=s_sh,
                                           teacher_shardings=t_sh, num_classes=C)
        return made[key]

    return get


RULES = {
    "rep": replicated(),
    "fsdp": STUDENT_RULE,
    "stacked_fsdp": TEACHER_RULE,
    # Megatron MLP: first layer split on its outputs, second on its inputs.
    "tp": stacked(tensor_parallel({"w1": P(None, "model"), "b1": P("model"), "w2": P("model")})),
    "per_teacher": per_teacher(),  # K = 4 teachers, one per device group along "model"
}


@pytest.mark.parametrize("student_rule", ["rep", "fsdp"])
def test_distill_with_fsdp_teachers_equals_one_device(problem, reference, distill_steps,
                                                      student_rule):
    student, teachers, batches = problem
    s_sh, step = distill_steps((2, 4), student_rule, "stacked_fsdp")
    state = init_train_state(student, _tx())
    got = _run(step, state, batches[:STEPS], teacher_params=teachers)
    _assert_same(got, reference[0])
    # The new state keeps its layout: Adam's moments are laid out like the params.
    new = got[0]
    assert new.params["w1"].sharding.spec == s_sh.params["w1"].spec
    assert new.opt_state[0].mu["w1"].sharding.spec == s_sh.params["w1"].spec
    if student_rule == "fsdp":
        assert s_sh.params["w1"].spec == P(None, "model")
        assert s_sh.opt_state[0].nu["w1"].spec == P(None, "model")
        assert new.params["w1"].addressable_shards[0].data.shape == (D, H // 4)
    else:
        assert all(s.spec == P() for s in jax.tree.leaves(s_sh))


def _teacher_bytes_split(teachers):
    return sum(v.nbytes for k, v in teachers.items() if k.startswith("w"))


def test_compiled_step_keeps_teacher_shards_at_a_quarter(problem, distill_steps):
    student, teachers, batches = problem
    state = init_train_state(student, _tx())
    compiled = {}
    for name in ("rep", "stacked_fsdp"):
        _, step = distill_steps((2, 4), "rep", name)
        compiled[name] = step.lower(state, batches[0], KEY, teacher_params=teachers).compile()
    # The compiled program's own argument shardings: teacher weights split 4 ways.
    args, _ = compiled["stacked_fsdp"].input_shardings
    got = args[3]["teacher_params"]
    assert got["w1"].spec == P(None, None, "model") and got["w2"].spec == P(None, "model")
    assert got["b1"].spec == P() and got["b2"].spec == P()
    for name in ("w1", "w2"):
        shape = teachers[name].shape
        shard = got[name].shard_shape(shape)
        assert math.prod(shard) * 4 == math.prod(shape), (name, shard)
    rep_args, _ = compiled["rep"].input_shardings
    assert all(s.is_fully_replicated for s in jax.tree.leaves(rep_args[3]))
    # XLA's accounting of the per-device argument bytes: 3/4 of the teacher weights are gone.
    saved = (compiled["rep"].memory_analysis().argument_size_in_bytes
             - compiled["stacked_fsdp"].memory_analysis().argument_size_in_bytes)
    assert saved == _teacher_bytes_split(teachers) * 3 // 4
    # Placed teachers hold a quarter of each weight per device and are used where they are.
    placed = jax.device_put(teachers, tree_shardings(teachers, make_mesh(2, 4), TEACHER_RULE))
    assert {s.data.shape for s in placed["w1"].addressable_shards} == {(K, D, TH // 4)}
    assert {s.data.shape for s in placed["w2"].addressable_shards} == {(K, TH // 4, C)}
    _, step = distill_steps((2, 4), "rep", "stacked_fsdp")
    new, _ = step(state, batches[0], KEY, teacher_params=placed)
    assert int(new.step) == 1


def test_tensor_parallel_rule_equals_one_device(problem, reference, distill_steps):
    student, teachers, batches = problem
    mesh = make_mesh(2, 4)
    t_sh = tree_shardings(teachers, mesh, RULES["tp"])
    assert t_sh["w1"].spec == P(None, None, "model") and t_sh["b1"].spec == P(None, "model")
    assert t_sh["w2"].spec == P(None, "model") and t_sh["b2"].spec == P()
    _, step = distill_steps((2, 4), "fsdp", "tp")
    got = _run(step, init_train_state(student, _tx()), batches[:STEPS], teacher_params=teachers)
    _assert_same(got, reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("teacher_rule", ["per_teacher", "rep"])
def test_more_teacher_layouts_equal_one_device(problem, reference, distill_steps, teacher_rule):
    student, teachers, batches = problem
    _, step = distill_steps((4, 2), "fsdp", teacher_rule)
    got = _run(step, init_train_state(student, _tx()), batches[:STEPS], teacher_params=teachers)
    _assert_same(got, reference[0])


def test_codistill_under_sharding_equals_one_device(problem):
    _, teachers, batches = problem
    mesh = make_mesh(2, 4)
    codistill = make_codistill_step(_mlp, _tx(), temperature=2.0, alpha=0.2)
    state = init_stacked_train_state(teachers, _tx())
    # K = 4 models trained at once, one per device group along "model".
    sh = state_shardings(state, mesh, per_teacher())
    assert sh.params["w1"].spec == P("model") and sh.opt_state[0].mu["w1"].spec == P("model")
    step = sharded_step(codistill, mesh, state_shardings=sh)
    _assert_same(_run(step, state, batches[:STEPS]), _reference(codistill, state, batches[:STEPS]))


@pytest.mark.slow
def test_supervised_under_sharding_equals_one_device(problem):
    # Slow only for the suite's time budget: the same `sharded_step` as the distill tests.
    _, teachers, batches = problem
    mesh = make_mesh(2, 4)
    supervised = make_supervised_step(_mlp, _tx())
    one = jax.tree.map(lambda v: v[0], teachers)
    state = init_train_state(one, _tx())
    step = sharded_step(supervised, mesh,
                        state_shardings=state_shardings(state, mesh, fsdp(min_size=64)))
    _assert_same(_run(step, state, batches[:STEPS]),
                 _reference(supervised, state, batches[:STEPS]))


def test_eval_step_under_sharding_equals_one_device(problem):
    student, teachers, batches = problem
    mesh = make_mesh(2, 4)
    eval_step = make_eval_step(_mlp, make_stacked_apply(_mlp, strategy="loop"))
    run = sharded_eval_step(
        eval_step, mesh, params_shardings=tree_shardings(student, mesh, STUDENT_RULE),
        teacher_shardings=tree_shardings(teachers, mesh, TEACHER_RULE),
    )
    for batch in batches[:2]:
        got = run(student, batch, teacher_params=teachers)
        want = jax.jit(eval_step)(student, batch, teacher_params=teachers)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_checkpoint_saved_on_one_mesh_restores_on_another(problem, reference, distill_steps,
                                                          tmp_path):
    student, teachers, batches = problem
    devices = jax.devices()
    (mid_ref, _), end_ref, one_device_step = reference
    # 3 steps on a 4 x 2 mesh, saved sharded.
    sh42, step42 = distill_steps((4, 2), "fsdp", "stacked_fsdp")
    mid, _ = _run(step42, init_train_state(student, _tx()), batches[:STEPS],
                  teacher_params=teachers)
    assert mid.params["w1"].sharding.spec == P(None, "model")
    assert mid.params["w1"].addressable_shards[0].data.shape == (D, H // 2)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(STEPS, mid)
        ckpt.wait()
        # Onto 2 x 4, continued with the sharded step there.
        sh24, step24 = distill_steps((2, 4), "fsdp", "stacked_fsdp")
        restored = ckpt.restore(abstract_like(mid, sh24)).state
        for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh24), strict=True):
            assert a.sharding == s
        assert restored.params["w1"].addressable_shards[0].data.shape == (D, H // 4)
        _assert_same((restored, []), (mid_ref, []))
        _assert_same(_run(step24, restored, batches[STEPS:], teacher_params=teachers), end_ref)
        # Onto one device, continued with the plain jitted step.
        one = state_shardings(mid, make_mesh(1, 1, devices=devices[:1]), replicated())
        restored = ckpt.restore(abstract_like(mid, one)).state
        assert all(a.sharding.device_set == {devices[0]} for a in jax.tree.leaves(restored))
        got = _run(one_device_step, restored, [_on_one_device(b) for b in batches[STEPS:]],
                   teacher_params=_on_one_device(teachers))
        _assert_same(got, end_ref)


def test_rules_that_cannot_apply_name_the_parameter(problem):
    student, teachers, _ = problem
    mesh = make_mesh(2, 4)
    cases = [
        tensor_parallel({"b1": P(None, "model")}),  # b1 has one axis
        tensor_parallel({"w2": P(None, "model")}),  # C = 4 over 4: fine
        tensor_parallel({"w1": P("nope")}),
        tensor_parallel({"w1": P("model", "model")}),
    ]
    with pytest.raises(ValueError, match=r"`b1`.*rank 1"):
        tree_shardings(student, mesh, cases[0])
    with pytest.raises(ValueError, match=r"`b2`.*axis 0 of size 4 does not divide over 8"):
        tree_shardings(student, mesh, tensor_parallel({"b2": P(("data", "model"))}))
    sh = tree_shardings(student, mesh, cases[1])  # 4 classes over 4 devices is fine
    assert sh["w2"].spec == P(None, "model")
    with pytest.raises(ValueError, match=r"`w1`.*mesh axis 'nope'.*\('data', 'model'\)"):
        tree_shardings(student, mesh, cases[2])
    with pytest.raises(ValueError, match=r"`w1`.*twice"):
        tree_shardings(student, mesh, cases[3])
    with pytest.raises(ValueError, match=r"`teacher_params/w2`.*size 4 does not divide over 8"):
        tree_shardings(teachers, mesh, stacked(tensor_parallel({"w2": P(None, ("data", "model"))})),
                       prefix="teacher_params/")
    # K = 3 teachers cannot be one per device group over 4 groups.
    three = jax.tree.map(lambda v: v[:3], teachers)
    with pytest.raises(ValueError, match=r"`b1` has shape \(3, 32\).*size 3 does not divide"):
        tree_shardings(three, mesh, per_teacher())
    state = init_train_state(student, _tx())
    with pytest.raises(ValueError, match=r"`params/b1`.*rank"):
        state_shardings(state, mesh, cases[0])
    with pytest.raises(ValueError, match=r"mesh has axes"):
        tree_shardings(student, mesh, fsdp(axis="fsdp"))
    with pytest.raises(TypeError, match=r"mapping\['w1'\]"):
        tensor_parallel({"w1": ("model",)})


def test_sharded_step_refuses_a_mismatch(problem):
    student, _, batches = problem
    mesh, other = make_mesh(2, 4), make_mesh(4, 2)
    state = init_train_state(student, _tx())
    with pytest.raises(ValueError, match=r"`state_shardings` are over mesh \{'data': 4"):
        sharded_step(_distill(), mesh, state_shardings=state_shardings(state, other, fsdp()))
    with pytest.raises(ValueError, match=r"`data_axis` 'batch'"):
        sharded_step(_distill(), mesh, state_shardings=state_shardings(state, mesh, fsdp()),
                     data_axis="batch")
    per_device = make_supervised_step(_mlp, _tx(), axis_name="data")
    step = sharded_step(per_device, mesh, state_shardings=state_shardings(state, mesh, fsdp()))
    with pytest.raises(ValueError, match=r"axis_name=None"):
        step(state, batches[0], KEY)


def test_batches_split_over_the_data_axis_of_a_2d_mesh(problem):
    batch = problem[2][0]
    mesh = make_mesh(2, 4)
    placed = shard_batch(batch, mesh, data_axis="data")
    local = global_batch_from_local(batch, mesh, data_axis="data")
    for k in batch:
        assert placed[k].sharding.spec == P("data") == local[k].sharding.spec
        assert placed[k].addressable_shards[0].data.shape[0] == B // 2
        np.testing.assert_array_equal(np.asarray(local[k]), batch[k])
    with pytest.raises(ValueError, match="exactly one axis"):
        shard_batch(batch, mesh)
    with pytest.raises(ValueError, match="does not divide over 2"):
        shard_batch({"x": batch["x"][:5]}, mesh, data_axis="data")


def test_fsdp_picks_the_largest_divisible_axis():
    mesh = make_mesh(2, 4)
    rule = fsdp(min_size=10)
    assert rule("a", (12, 40), mesh) == P(None, "model")
    assert rule("a", (40, 12), mesh) == P("model")
    assert rule("a", (6, 5, 8), mesh) == P(None, None, "model")  # 8 is the only divisible one
    assert rule("a", (7, 9), mesh) == P()
    assert rule("a", (4,), mesh) == P()  # under min_size
    assert fsdp(min_size=0)("a", (), mesh) == P()
    assert isinstance(tree_shardings({"w": jnp.ones((8, 8))}, mesh, rule)["w"], NamedSharding)


def test_teacher_inference_and_cache_build_under_shardings(problem, tmp_path):
    _, teachers, batches = problem
    mesh = make_mesh(2, 4)
    teacher_apply = make_stacked_apply(_mlp, strategy="vmap")
    x = batches[0]["x"]
    want = np.asarray(jax.jit(teacher_apply)(teachers, x))
    # One teacher per device group; the batch split over "data".
    run = sharded_teacher_apply(
        teacher_apply, teacher_shardings=tree_shardings(teachers, mesh, per_teacher())
    )
    got = run(teachers, x)
    assert got.sharding.spec == P(None, "data")
    np.testing.assert_allclose(np.asarray(got), want, **TOL)
    # The cache built from FSDP-sharded teachers holds the same logits, batch of 5 included
    # (the batch is replicated over the teachers' mesh, so it needs not divide).
    sh = tree_shardings(teachers, mesh, TEACHER_RULE)
    cache_batches = [{"x": x[:11], "index": np.arange(11)},
                     {"x": x[11:], "index": 11 + np.arange(5)}]
    cache = build_cache_in_parallel(tmp_path / "c", teacher_apply, teachers, cache_batches,
                                    num_examples=B, dtype=np.float32, progress=False,
                                    teacher_shardings=sh)
    stored = cache.lookup(np.arange(B))  # [K, B, C]
    np.testing.assert_allclose(stored, want, **TOL)


def test_the_readme_example_runs():
    """README's "Teachers that do not fit on one device": the first block, as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Teachers that do not fit on one device"):]
    end = section.find("\n## ", 1)  # the next section, if any
    section = section if end < 0 else section[:end]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2  # the second needs several hosts
    namespace = {}
    exec(blocks[0], namespace)
    state, t_sh = namespace["state"], namespace["t_sh"]
    assert int(state.step) == 1 and np.isfinite(float(namespace["metrics"]["loss"]))
    assert t_sh["w1"].spec == P(None, None, "model") and t_sh["w2"].spec == P(None, "model")
    # Restored onto the 4 x 2 mesh: the student's first weight split 2 ways.
    assert state.params["w1"].sharding.mesh.shape == {"data": 4, "model": 2}
    assert state.params["w1"].addressable_shards[0].data.shape == (64, 64)
