"""Teachers with their own tokenizers: the vocabulary projection (prefix, ULD), fusion over
the teachers available at each student token, and the distillation step on aligned teachers,
against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import STUDENT_MERGES, TEACHER_MERGES, byte_bpe, np_softmax

from mtkd_jax.core.vocab_projection import (
    VocabProjection,
    project_logits,
    project_probs,
    uld_distance,
    uld_from_top,
    unmatched_top,
)
from mtkd_jax.objective.cross_tokenizer import (
    aligned_inputs,
    aligned_teacher_heads,
    aligned_teacher_logits,
    aligned_uld_sums,
    make_aligned_teachers,
    student_input,
    student_unmatched,
)
from mtkd_jax.objective.loss import distill_sums, finish_distill
from mtkd_jax.parallel import data_parallel_step, make_mesh
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step

V_S = 11


def _projection(rng, v_t, v_s=V_S):
    exact = np.where(rng.random(v_t) < 0.6, rng.permutation(max(v_t, v_s))[:v_t] % v_s, -1)
    _, first = np.unique(exact, return_index=True)  # one teacher token per student token
    exact = np.where(np.isin(np.arange(v_t), first), exact, -1)
    prefix = np.where(exact >= 0, exact, rng.integers(-1, v_s, v_t))
    return VocabProjection.from_maps(exact, prefix, student_vocab_size=v_s)


def _ref_project(p, proj, method):
    target = np.asarray(proj.prefix if method == "prefix" else proj.exact)
    q = np.zeros(p.shape[:-1] + (proj.student_vocab_size,))
    for t, s in enumerate(target):
        if s >= 0:
            q[..., s] += p[..., t]
    total = q.sum(-1, keepdims=True)
    return np.where(total > 0, q / np.where(total > 0, total, 1), 0)


def _ref_uld(z_s, p_t, proj, temperature=1.0):
    q = np_softmax(z_s, temperature)
    a = np.where(np.asarray(proj.exact) < 0, p_t, 0.0)
    b = np.where(np.asarray(proj.student_matched), 0.0, q)
    width = max(a.shape[-1], b.shape[-1])
    a = -np.sort(-a, -1)
    b = -np.sort(-b, -1)
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
    b = np.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, width - b.shape[-1])])
    return np.abs(a - b).sum(-1)


@pytest.mark.parametrize("method", ["prefix", "uld"])
@pytest.mark.parametrize("v_t", [7, 17])
def test_projection_matches_reference(rng, method, v_t):
    proj = _projection(rng, v_t)
    z = rng.normal(size=(3, 2, 5, v_t)) * 2  # [K?, B, L, V_t]
    p = np_softmax(z)
    got = jax.jit(lambda p: project_probs(p, proj, method=method))(jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(got, _ref_project(p, proj, method), rtol=1e-5, atol=1e-7)
    # project_logits: a softmax of them is the projected distribution, never NaN.
    zl = project_logits(jnp.asarray(z, jnp.float32), proj, method=method)
    assert np.all(np.isfinite(zl))
    ref = _ref_project(p, proj, method)
    has = ref.sum(-1, keepdims=True) > 0
    np.testing.assert_allclose(np.where(has, jax.nn.softmax(zl, -1), 0), ref, atol=1e-6)
    # Maps passed traced (the scatter path) give the gathers' numbers (the host-planned path).
    traced = jax.jit(lambda p, z, proj: (project_probs(p, proj, method=method),
                                         project_logits(z, proj, method=method)))(
        jnp.asarray(p, jnp.float32), jnp.asarray(z, jnp.float32), proj)
    np.testing.assert_allclose(traced[0], got, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.where(has, jax.nn.softmax(traced[1], -1), 0), ref, atol=1e-6)


def test_projection_of_another_vocabulary_size(rng):
    proj = _projection(rng, 7)
    with pytest.raises(ValueError, match="teacher vocabulary of 7"):
        project_probs(jnp.ones((2, 9)) / 9, proj)
    with pytest.raises(ValueError, match="method"):
        project_probs(jnp.ones((2, 7)) / 7, proj, method="nearest")
    with pytest.raises(ValueError, match="student vocabulary"):
        uld_distance(jnp.zeros((2, V_S + 1)), jnp.ones((2, 7)) / 7, proj)
    with pytest.raises(ValueError, match="outside"):
        VocabProjection.from_maps([0, 12], [0, 0], student_vocab_size=V_S)


@pytest.mark.parametrize("v_t", [7, 23])
def test_uld_distance_value_and_gradient(rng, v_t):
    proj = _projection(rng, v_t)
    z_s = rng.normal(size=(4, V_S)) * 2
    p_t = np_softmax(rng.normal(size=(4, v_t)) * 2)
    fn = jax.jit(lambda z: uld_distance(z, jnp.asarray(p_t, jnp.float32), proj,
                                        temperature=1.5))
    np.testing.assert_allclose(fn(jnp.asarray(z_s, jnp.float32)),
                               _ref_uld(z_s, p_t, proj, 1.5), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(fn(z)))(jnp.asarray(z_s, jnp.float32))
    eps, ref = 1e-6, np.zeros_like(z_s)
    for i in np.ndindex(z_s.shape):
        d = np.zeros_like(z_s)
        d[i] = eps
        ref[i] = (_ref_uld(z_s + d, p_t, proj, 1.5).sum()
                  - _ref_uld(z_s - d, p_t, proj, 1.5).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, ref, rtol=1e-3, atol=1e-5)


def _aligned_inputs(rng, b=2, length=6, sizes=(7, 13), lt=(9, 5)):
    projs = [_projection(rng, v) for v in sizes]
    logits = [rng.normal(size=(b, n, v)).astype(np.float32) for n, v in zip(lt, sizes,
                                                                          strict=True)]
    index = np.stack([rng.integers(0, n, (b, length)) for n in lt]).astype(np.int32)
    avail = (rng.random((len(sizes), b, length)) < 0.6).astype(np.float32)
    avail[:, 0, 0] = 0.0  # a position no teacher can speak at
    return logits, index, avail, projs


@pytest.mark.parametrize("method", ["prefix", "uld"])
def test_aligned_teacher_logits_gather_then_project(rng, method):
    logits, index, avail, projs = _aligned_inputs(rng)
    z, a = jax.jit(lambda ls: aligned_teacher_logits(ls, index, avail, projs, method=method))(
        logits)
    assert z.shape == (2, 2, 6, V_S) and a.shape == (2, 2, 6)
    for k in range(2):
        g = np.take_along_axis(logits[k], index[k][..., None], axis=1)
        ref = _ref_project(np_softmax(g), projs[k], method)
        has = ref.sum(-1, keepdims=True) > 0
        np.testing.assert_allclose(np.where(has, jax.nn.softmax(z[k], -1), 0), ref, atol=1e-6)
    with pytest.raises(ValueError, match="teacher vocabulary"):
        aligned_teacher_logits(logits, index, avail, projs[::-1])


@pytest.mark.parametrize("weighting", ["uniform", "posterior"])
def test_fusion_over_available_teachers_matches_reference(rng, weighting):
    logits, index, avail, projs = _aligned_inputs(rng)
    z, a = aligned_teacher_logits(logits, index, avail, projs, method="prefix")
    s = rng.normal(size=(2, 6, V_S)).astype(np.float32)
    y = rng.integers(0, V_S, (2, 6))
    mask = np.ones((2, 6), np.float32)
    mask[1, -1] = 0.0
    sums = jax.jit(lambda s: distill_sums(s, z, y, mask=mask, weighting=weighting,
                                          available=a, temperature=2.0))(s)
    parts, metrics = finish_distill(sums)
    # Reference: teacher probabilities at T, weights over the available teachers only
    # (uniform, or the posterior softmax of log p_k(y) over them), target = their mix.
    p = np.stack([_ref_project(np_softmax(np.take_along_axis(lg, ix[..., None], 1)), pr,
                               "prefix") for lg, ix, pr in zip(logits, index, projs,
                                                              strict=True)])
    pt = np.where(p > 0, p, 0) ** 0.5
    pt = pt / pt.sum(-1, keepdims=True)
    total, count, none = 0.0, 0.0, 0.0
    for bi in range(2):
        for i in range(6):
            if not mask[bi, i]:
                continue
            count += 1
            on = [k for k in range(2) if a[k, bi, i] > 0]
            if not on:
                none += 1
                continue
            if weighting == "uniform":
                w = np.ones(len(on)) / len(on)
            else:
                ev = np.log(np.maximum([p[k, bi, i, y[bi, i]] for k in on], 1e-300))
                w = np.exp(ev - ev.max())
                w = w / w.sum()
            t = sum(wk * pt[k, bi, i] for wk, k in zip(w, on, strict=True))
            logq = np.log(np_softmax(s[bi, i] / 2.0))
            total += 4.0 * np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - logq),
                                           0))
    np.testing.assert_allclose(parts.soft, total / count, rtol=1e-4)
    np.testing.assert_allclose(metrics["unaligned"], none / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["teacher_available"],
                               (a * mask).sum((1, 2)) / count, rtol=1e-6)
    assert np.isfinite(float(parts.loss))
    g = jax.grad(lambda s: finish_distill(distill_sums(s, z, y, mask=mask, available=a))[0]
                 .loss)(jnp.asarray(s))
    assert np.all(np.isfinite(g)) and np.all(g[0, 0] == 0)  # no teacher at (0, 0): no pull


def test_no_teacher_anywhere_gives_zero_not_nan(rng):
    s = jnp.asarray(rng.normal(size=(1, 3, 5)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 1, 3, 5)), jnp.float32)
    parts, metrics = finish_distill(distill_sums(s, z, available=jnp.zeros((2, 1, 3)),
                                                 weighting="confidence",
                                                 labels=jnp.zeros((1, 3), jnp.int32)))
    assert float(parts.soft) == 0.0 and float(metrics["unaligned"]) == 1.0


def test_aligned_uld_sums_match_reference(rng):
    logits, index, avail, projs = _aligned_inputs(rng)
    s = rng.normal(size=(2, 6, V_S)).astype(np.float32)
    mask = np.ones((2, 6), np.float32)
    mask[1, :2] = 0
    total, count = jax.jit(lambda s: aligned_uld_sums(s, logits, index, avail, projs,
                                                      mask=mask))(s)
    ref = 0.0
    for bi in range(2):
        for i in range(6):
            on = [k for k in range(2) if avail[k, bi, i] > 0]
            if mask[bi, i] and on:
                ref += np.mean([_ref_uld(s[bi, i], np_softmax(logits[k][bi, index[k, bi, i]]),
                                         projs[k]) for k in on])
    np.testing.assert_allclose(total, ref, rtol=1e-5)
    assert float(count) == mask.sum()
    g = jax.grad(lambda s: aligned_uld_sums(s, logits, index, avail, projs)[0])(jnp.asarray(s))
    assert np.all(np.isfinite(g))


def _identity(v):
    return VocabProjection.from_maps(np.arange(v), np.arange(v), student_vocab_size=v)


@pytest.mark.parametrize("chunked", [False, True])
def test_teachers_with_the_students_tokenizer_give_exactly_the_shared_path(rng, chunked):
    """Aligned to itself (index = position, all available) with the identity projection,
    the loss and every metric of the step equal the shared-vocabulary step's bit for bit, and
    the updated parameters to float32 rounding (the two gradients are different XLA programs,
    the availability path renormalises the weights: 1 ulp in 1-2 of 55 entries)."""
    b, length, h, k = 3, 7, 5, 2
    x = rng.normal(size=(b, length, h)).astype(np.float32)
    zt = [rng.normal(size=(b, length, V_S)).astype(np.float32) for _ in range(k)]
    y = rng.integers(0, V_S, (b, length)).astype(np.int32)
    mask = np.ones((b, length), np.float32)
    mask[2, 4:] = 0
    index = np.broadcast_to(np.arange(length), (k, b, length)).astype(np.int32)
    avail = np.broadcast_to(mask, (k, b, length)).astype(np.float32)
    z_al, a_al = aligned_teacher_logits(zt, index, avail, [_identity(V_S)] * k)
    np.testing.assert_array_equal(z_al, np.stack(zt))
    tx = optax.adam(1e-2)
    w = rng.normal(size=(h, V_S)).astype(np.float32)
    if chunked:
        step = make_distill_step(lambda p, x: x, None, tx, student_head=lambda p, f: f @ p,
                                 chunk_size=3, weighting="confidence", alpha=0.3,
                                 temperature=2.0)
    else:
        step = make_distill_step(lambda p, x: x @ p, None, tx, weighting="confidence",
                                 alpha=0.3, temperature=2.0)
    step = jax.jit(step)
    state = init_train_state(jnp.asarray(w), tx)
    shared = {"x": x, "y": y, "mask": mask, "teacher_logits": np.stack(zt)}
    s1, m1 = step(state, shared, jax.random.key(0))
    s2, m2 = step(state, {**shared, "teacher_logits": z_al, "teacher_available": a_al},
                  jax.random.key(0))
    for name in m1:
        np.testing.assert_array_equal(m1[name], m2[name], err_msg=name)
    np.testing.assert_allclose(s1.params, s2.params, rtol=1e-6, atol=1e-7)
    assert float(m2["unaligned"]) == 0.0


def _tiny_lm(vocab, seed, length=16, dim=16):
    from mtkd_jax.models.transformer import Transformer, TransformerConfig
    from mtkd_jax.models.zoo.token import token_model_fns

    cfg = TransformerConfig(vocab_size=vocab, dim=dim, depth=1, heads=2, kv_heads=1,
                            mlp_dim=32, max_len=length)
    return token_model_fns(Transformer(cfg, rngs=nnx.Rngs(seed)))


def _aligned_rows(tmp_path, copies=2):
    """Two byte-level BPE tokenizers built by hand, the texts packed for the student with
    teachers reading the teacher's and the student's own tokens (at most 8 rows): `(teacher,
    student, rows, projections, batch)`, `batch` every row in the steps' layout."""
    from mtkd_jax.data.alignment import build_projection, pack_aligned

    teacher = byte_bpe(tmp_path / "t.json", TEACHER_MERGES)
    student = byte_bpe(tmp_path / "s.json", STUDENT_MERGES)
    texts = ["hello world", "aé😀b hello", "world hello world", "hello hello", "wor ld",
             "héllo wörld", "hello", "world world"] * copies
    rows = pack_aligned(texts, student, [teacher, student], seq_len=8, teacher_len=12)
    rows = {k: v[:, :8] if k.startswith("teacher_") else v[:8] for k, v in rows.items()}
    projections = [build_projection(teacher, student), build_projection(student, student)]
    batch = {"x": {"tokens": rows["x"], "segment_ids": rows["segment_ids"],
                   "positions": rows["positions"]},
             "y": rows["y"], "mask": rows["mask"],
             **{k: v for k, v in rows.items() if k.startswith("teacher_")}}
    return teacher, student, rows, projections, batch


@pytest.mark.parametrize("method", ["prefix", "uld"])
def test_aligned_teachers_in_the_step_one_device_equals_eight(tmp_path, method):
    teacher, student, rows, projections, batch = _aligned_rows(tmp_path)
    t_fns = [_tiny_lm(teacher.vocab_size, 1), _tiny_lm(student.vocab_size, 2)]
    teachers = make_aligned_teachers([f.logits for f, _ in t_fns], projections,
                                     method=method, uld_size=8)
    tp = tuple(p for _, p in t_fns)
    fns, sp = _tiny_lm(student.vocab_size, 0)
    tx = optax.adam(1e-2)
    step = make_distill_step(fns.features, None, tx, student_head=fns.head, chunk_size=3,
                             weighting="posterior", alpha=0.5, temperature=2.0,
                             student_unmatched=student_unmatched(projections))

    def aligned_step(state, batch, key):
        return step(state, {**batch, **teachers(tp, batch)}, key)

    state = init_train_state(sp, tx)
    one = data_parallel_step(aligned_step, make_mesh(devices=jax.devices()[:1]))
    eight = data_parallel_step(aligned_step, make_mesh())
    s1, m1 = one(state, batch, jax.random.key(0))
    s8, m8 = eight(state, batch, jax.random.key(0))
    assert np.isfinite(float(m1["loss"]))
    # The student's own tokenizer speaks at every real token; the teacher at fewer.
    a = rows["teacher_available"]
    np.testing.assert_allclose(m1["teacher_available"],
                               (a * rows["mask"]).sum((1, 2)) / rows["mask"].sum(), rtol=1e-6)
    assert float(m1["teacher_available"][1]) == 1.0 and float(m1["unaligned"]) == 0.0
    for name in ("loss", "teacher_weights", "teacher_available"):
        np.testing.assert_allclose(m1[name], m8[name], rtol=1e-5, err_msg=name)
    for p1, p8 in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(p1, p8, rtol=1e-4, atol=1e-6)


def test_chunked_aligned_teachers_equal_the_precomputed_path(tmp_path):
    """`aligned_teacher_heads` (features gathered, heads and projection per chunk) gives the
    step of `make_aligned_teachers` (whole projected logits): the same loss and metrics, the
    same update; with teachers of different widths and vocabularies (one the student's own
    tokenizer), on 1 device and on 8."""
    teacher, student, _, projections, batch = _aligned_rows(tmp_path)
    t_fns = [_tiny_lm(teacher.vocab_size, 1, dim=24), _tiny_lm(student.vocab_size, 2)]
    tp = tuple(p for _, p in t_fns)
    fns, sp = _tiny_lm(student.vocab_size, 0)
    tx = optax.adam(1e-2)
    kw = dict(student_head=fns.head, chunk_size=3, weighting="confidence", alpha=0.5,
              temperature=2.0)
    whole = make_aligned_teachers([f.logits for f, _ in t_fns], projections)
    plain = make_distill_step(fns.features, None, tx, **kw)
    t_apply, t_head = aligned_teacher_heads([f.features for f, _ in t_fns],
                                            [f.head for f, _ in t_fns], projections)
    chunked = make_distill_step(student_input(fns.features), t_apply, tx,
                                teacher_head=t_head, **kw)
    state = init_train_state(sp, tx)
    key = jax.random.key(0)
    s1, m1 = jax.jit(lambda st, b: plain(st, {**b, **whole(tp, b)}, key))(state, batch)
    s2, m2 = jax.jit(lambda st, b: chunked(st, aligned_inputs(b), key, teacher_params=tp))(
        state, batch)
    assert float(m1["teacher_available"][0]) < 1.0  # the teacher's own tokens: some unaligned
    for name in m1:
        np.testing.assert_allclose(m2[name], m1[name], rtol=2e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)

    def step(st, b, key):
        return chunked(st, aligned_inputs(b), key, teacher_params=tp)

    s8, m8 = data_parallel_step(step, make_mesh())(state, batch, key)
    for name in ("loss", "teacher_weights", "teacher_available", "agreement"):
        np.testing.assert_allclose(m8[name], m2[name], rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_student_vocabulary_cache_of_aligned_teachers(tmp_path):
    """A top-k cache of teachers with their own tokenizers, built in the student's vocabulary
    (their projected logits at the student's positions, `aligned_teacher_heads` run once):
    read back with the availability of the rows, the cached step gives the online aligned
    step's numbers (all V_s entries kept, float32 storage)."""
    from mtkd_jax.cache import build_cache, with_cached_logits

    teacher, student, rows, projections, batch = _aligned_rows(tmp_path, copies=1)
    n = rows["x"].shape[0]
    batch["index"] = np.arange(n)
    t_fns = [_tiny_lm(teacher.vocab_size, 1), _tiny_lm(student.vocab_size, 2)]
    tp = tuple(p for _, p in t_fns)
    t_apply, t_head = aligned_teacher_heads([f.features for f, _ in t_fns],
                                            [f.head for f, _ in t_fns], projections)
    v_s = student.vocab_size
    cache = build_cache(tmp_path / "cache", lambda tp, x: t_head(tp, t_apply(tp, x)), tp,
                        [aligned_inputs(batch)], num_examples=n, top_k=v_s,
                        dtype=np.float32, progress=False)
    fns, sp = _tiny_lm(v_s, 0)
    tx = optax.adam(1e-2)
    kw = dict(student_head=fns.head, chunk_size=3, weighting="confidence", alpha=0.5)
    online = make_distill_step(student_input(fns.features), t_apply, tx, teacher_head=t_head,
                               **kw)
    cached = make_distill_step(fns.features, None, tx, **kw)
    state, key = init_train_state(sp, tx), jax.random.key(0)
    _, m1 = jax.jit(lambda st, b: online(st, aligned_inputs(b), key, teacher_params=tp))(
        state, batch)
    b2 = next(with_cached_logits(iter([{k: v for k, v in batch.items()
                                        if k in ("x", "y", "mask", "index",
                                                 "teacher_available")}]), cache))
    b2.pop("index")
    _, m2 = jax.jit(lambda st, b: cached(st, b, key))(state, b2)
    assert b2["teacher_logits"].shape == (2, n, 8, v_s)
    for name in ("loss", "soft_loss", "teacher_weights", "teacher_available", "agreement"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_chunked_aligned_teachers_bad_input():
    proj = VocabProjection.from_maps([0, 1], [0, 1], student_vocab_size=2)
    f = lambda p, x: x  # noqa: E731
    with pytest.raises(ValueError, match="support method 'prefix'"):
        aligned_teacher_heads([f], [f], [proj], method="uld")
    with pytest.raises(ValueError, match="one of each per teacher"):
        aligned_teacher_heads([f, f], [f], [proj])
    with pytest.raises(KeyError, match="pack_aligned"):
        aligned_inputs({"x": jnp.zeros((2, 3), jnp.int32), "teacher_tokens": None})


@pytest.mark.parametrize("size", [3, 40])
def test_uld_from_a_precomputed_top(rng, size):
    """M covering both vocabularies: exactly `uld_distance`; a smaller M: the top M entries
    compared one by one and the rest by its mass (float64 reference)."""
    proj = _projection(rng, 23)
    z_s = rng.normal(size=(4, V_S)) * 2
    p_t = np_softmax(rng.normal(size=(4, 23)) * 2)
    top = unmatched_top(jnp.asarray(p_t, jnp.float32), proj, size=size)
    got = uld_from_top(jnp.asarray(z_s, jnp.float32), top, ~proj.student_matched)
    a = -np.sort(-np.where(np.asarray(proj.exact) < 0, p_t, 0), -1)
    b = -np.sort(-np.where(proj.student_matched, 0, np_softmax(z_s)), -1)
    width = max(23, V_S, size)
    a, b = (np.pad(v, [(0, 0), (0, width - v.shape[-1])]) for v in (a, b))
    ref = np.abs(a[:, :size] - b[:, :size]).sum(-1) + np.abs(a[:, size:].sum(-1)
                                                             - b[:, size:].sum(-1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if size >= 23:
        np.testing.assert_allclose(got, _ref_uld(z_s, p_t, proj), rtol=1e-5, atol=1e-6)


def test_uld_term_in_the_loss_matches_reference(rng):
    """soft = KL to the matched-mass target + lambda * sum_k w_k ULD_k, per token."""
    logits, index, avail, projs = _aligned_inputs(rng)
    z, a = aligned_teacher_logits(logits, index, avail, projs, method="uld")
    from mtkd_jax.objective.cross_tokenizer import aligned_unmatched

    un = aligned_unmatched(logits, index, projs, size=32)
    su = student_unmatched(projs)
    s = rng.normal(size=(2, 6, V_S)).astype(np.float32)

    def soft(s, lam):
        sums = distill_sums(s, z, available=a, unmatched=un, student_unmatched=su,
                            uld_weight=lam)
        return finish_distill(sums)[0].soft

    base = soft(jnp.asarray(s), 0.0)
    ref = 0.0
    for bi in range(2):
        for i in range(6):
            on = [k for k in range(2) if a[k, bi, i] > 0]
            for k in on:
                p = np_softmax(logits[k][bi, index[k, bi, i]])
                ref += _ref_uld(s[bi, i], p, projs[k]) / len(on)   # uniform weights
    np.testing.assert_allclose(soft(jnp.asarray(s), 0.7) - base, 0.7 * ref / 12, rtol=1e-4)
    g = jax.grad(soft)(jnp.asarray(s), 0.7)
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="student_unmatched"):
        distill_sums(s, z, available=a, unmatched=un)
