"""Distilling from top-k entries in their slot space (`mtkd_jax.objective.top_k_slots`):
a float64 NumPy reference of the loss and its gradient, the expanded path when the entries
hold every class, chunks, the step and the cache reader."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd_jax.cache import build_cache, top_k_of_logits, with_cached_top_k
from mtkd_jax.objective.loss import chunked_distill_sums, distill_sums, finish_distill
from mtkd_jax.objective.top_k_slots import top_k_slots
from mtkd_jax.parallel import data_parallel_step, make_mesh
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step


def _entries(rng, k_teachers, lead, v, k, labels=None):
    """Random teacher logits -> their top-k entries (float32), the label kept when given."""
    z = rng.normal(size=(k_teachers, *lead, v)) * 2.0
    top = top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k,
                          keep=None if labels is None else jnp.asarray(labels))
    return z, top


def _reference(z, top, y, weighting, alpha):
    """Float64 NumPy: per position, the slot distributions, weights, KL and CE; returns the
    mean loss over positions (`[N, V]` student, entries `[K, N, k]`)."""
    lp = np.asarray(top.log_probs, np.float64)
    cls = np.asarray(top.classes)
    rest = np.exp(np.asarray(top.log_rest, np.float64))
    kt, n, k = cls.shape
    v = z.shape[-1]
    total = 0.0
    for i in range(n):
        q = np.exp(z[i] - z[i].max())
        q /= q.sum()
        union = []
        for c in list(cls[:, i].ravel()) + ([int(y[i])] if y is not None else []):
            if c not in union:
                union.append(int(c))
        bucket = [c for c in range(v) if c not in union]
        p = np.empty((kt, len(union) + 1))
        for t in range(kt):
            fill = rest[t, i] / (v - k)
            own = dict(zip(cls[t, i].tolist(), np.exp(lp[t, i]).tolist(), strict=True))
            p[t, :-1] = [own.get(c, fill) for c in union]
            p[t, -1] = fill * len(bucket)
        qs = np.append(q[union], q[bucket].sum())
        if weighting == "uniform":
            w = np.full(kt, 1.0 / kt)
        else:  # confidence (CA-MKD): w = (1 - softmax(ce)) / (K - 1)
            ce = -np.log(p[:, union.index(int(y[i]))])
            e = np.exp(ce - ce.max())
            w = (1 - e / e.sum()) / (kt - 1)
        t = w @ p
        kl = np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - np.log(qs)), 0.0))
        ce_y = -np.log(q[int(y[i])]) if y is not None else 0.0
        total += (1 - alpha) * kl + alpha * ce_y
    return total / n


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), weighting=st.sampled_from(["uniform", "confidence"]),
       keep=st.booleans())
def test_slot_loss_and_gradient_match_float64_reference(seed, weighting, keep):
    rng = np.random.default_rng(seed)
    kt, n, v, k = 3, 5, 11, 3
    y = rng.integers(0, v, size=n)
    _, top = _entries(rng, kt, (n,), v, k, labels=y if keep else None)
    z = rng.normal(size=(n, v)) * 1.5
    alpha = 0.3

    def loss(zs):
        sums = distill_sums(zs, tuple(top), jnp.asarray(y), weighting=weighting)
        return finish_distill(sums, alpha=alpha)[0].loss

    got = float(loss(jnp.asarray(z, jnp.float32)))
    want = _reference(z, top, y, weighting, alpha)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(z, jnp.float32)))
    eps, num = 1e-6, np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        d = np.zeros_like(z)
        d[idx] = eps
        num[idx] = (_reference(z + d, top, y, weighting, alpha)
                    - _reference(z - d, top, y, weighting, alpha)) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("weighting", ["entropy", "posterior"])
def test_entries_holding_every_class_give_the_expanded_loss(weighting):
    rng = np.random.default_rng()
    kt, b, length, v = 3, 2, 4, 7
    y = rng.integers(0, v, size=(b, length))
    z_t, top = _entries(rng, kt, (b, length), v, v)
    z = jnp.asarray(rng.normal(size=(b, length, v)), jnp.float32)
    mask = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1]], jnp.float32)
    kw = dict(mask=mask, weighting=weighting)

    def parts(zs, teachers):
        loss, metrics = finish_distill(distill_sums(zs, teachers, jnp.asarray(y), **kw),
                                       alpha=0.5)
        return loss.loss, metrics

    (a, ma), ga = jax.value_and_grad(parts, has_aux=True)(z, tuple(top))
    (b_, mb), gb = jax.value_and_grad(parts, has_aux=True)(
        z, jnp.asarray(z_t, jnp.float32))
    np.testing.assert_allclose(a, b_, rtol=1e-5)
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)
    for name in ("teacher_weights", "agreement", "accuracy"):
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-6)


def test_chunked_slot_sums_equal_the_whole_batch():
    rng = np.random.default_rng()
    kt, b, length, h, v, k = 2, 3, 10, 4, 13, 3
    y = rng.integers(0, v, size=(b, length))
    _, top = _entries(rng, kt, (b, length), v, k, labels=y)
    f = jnp.asarray(rng.normal(size=(b, length, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, size=(b, length)), jnp.float32).at[:, 0].set(1.0)

    def head(w, f):
        return f @ w

    def whole(w):
        s = distill_sums(head(w, f), tuple(top), jnp.asarray(y), mask=mask,
                         weighting="confidence")
        return finish_distill(s, alpha=0.5)[0].loss

    def chunked(w):
        s = chunked_distill_sums(f, head, w, tuple(top), labels=jnp.asarray(y), mask=mask,
                                 chunk_size=4, weighting="confidence")
        return finish_distill(s, alpha=0.5)[0].loss

    np.testing.assert_allclose(jax.jit(chunked)(w), jax.jit(whole)(w), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.grad(chunked))(w), jax.jit(jax.grad(whole))(w),
                               rtol=1e-4, atol=1e-6)


def test_slots_are_distributions_and_the_rest_bucket_is_the_students_tail():
    rng = np.random.default_rng()
    kt, n, v, k = 3, 6, 40, 4
    y = rng.integers(0, v, size=n)
    _, top = _entries(rng, kt, (n,), v, k)
    z = jnp.asarray(rng.normal(size=(n, v)), jnp.float32)
    s = top_k_slots(z, *top, jnp.asarray(y))
    np.testing.assert_allclose(jnp.sum(jax.nn.softmax(s.teachers, -1), -1), 1.0, rtol=1e-5)
    q = np.asarray(jax.nn.softmax(s.student, -1))
    full = np.asarray(jax.nn.softmax(z, -1))
    for i in range(n):
        held = set(np.asarray(top.classes)[:, i].ravel().tolist()) | {int(y[i])}
        np.testing.assert_allclose(q[i, -1], full[i, sorted(set(range(v)) - held)].sum(),
                                   rtol=1e-5)
        assert int(s.labels[i]) < q.shape[-1] - 1
        np.testing.assert_allclose(q[i, int(s.labels[i])], full[i, y[i]], rtol=1e-5)


def _lm(v=16, h=8, kt=2, b=4, length=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    emb = jnp.asarray(rng.normal(size=(v, h)), jnp.float32)

    def features(p, x):
        return jnp.tanh(emb[x["tokens"]] @ p["w"])

    def head(p, f):
        return f @ p["out"]

    params = {"w": jnp.asarray(rng.normal(size=(h, h)), jnp.float32) * 0.3,
              "out": jnp.asarray(rng.normal(size=(h, v)), jnp.float32) * 0.3}
    tokens = rng.integers(0, v, size=(b, length))
    y = rng.integers(0, v, size=(b, length))
    _, top = _entries(rng, kt, (b, length), v, k, labels=y)
    batch = {"x": {"tokens": jnp.asarray(tokens)}, "y": jnp.asarray(y),
             "mask": jnp.ones((b, length), jnp.float32), "teacher_top_k": top}
    return features, head, params, batch


def test_top_k_entries_refuse_what_they_cannot_do():
    features, head, params, batch = _lm()
    tx = optax.sgd(0.1)
    state = init_train_state(params, tx)
    hot = make_distill_step(features, None, tx, student_head=head, temperature=2.0)
    with pytest.raises(ValueError, match="T = 1 only"):
        hot(state, batch, jax.random.key(0))
    short = dict(batch, teacher_top_k=tuple(a[:, :2] for a in batch["teacher_top_k"]))
    with pytest.raises(ValueError, match="log_rest"):
        make_distill_step(features, None, tx, student_head=head)(state, short,
                                                                  jax.random.key(0))
    with pytest.raises(TypeError, match="3-tuple"):
        distill_sums(jnp.zeros((2, 5)), (jnp.zeros((1, 2, 2)),) * 2)
    top = batch["teacher_top_k"]
    with pytest.raises(ValueError, match="`known`"):
        distill_sums(jnp.zeros((4, 6, 16)), tuple(top), known=jnp.ones((2, 16), bool))


def test_cache_entries_read_as_they_are_train_the_step(tmp_path):
    rng = np.random.default_rng()
    v, h, b, length = 12, 5, 4, 6
    w_t = jnp.asarray(rng.normal(size=(2, h, v)), jnp.float32)

    def teachers(tp, x):
        return jnp.einsum("blh,khv->kblv", x["f"], tp)

    f = rng.normal(size=(b, length, h)).astype(np.float32)
    y = rng.integers(0, v, size=(b, length))
    batch = {"x": {"f": f}, "y": y, "mask": np.ones((b, length), np.float32),
             "index": np.arange(b)}
    cache = build_cache(str(tmp_path), teachers, w_t, [batch], num_examples=b, top_k=4,
                        keep_labels=True, progress=False)
    got = next(with_cached_top_k([batch], cache))
    assert got["teacher_top_k"].classes.shape == (2, b, length, 4)
    head = lambda p, x: x @ p  # noqa: E731
    tx = optax.sgd(0.5)
    step = jax.jit(make_distill_step(lambda p, x: x["f"], None, tx, student_head=head,
                                     alpha=0.5, weighting="confidence"))
    state = init_train_state(jnp.zeros((h, v), jnp.float32), tx)
    losses = []
    for _ in range(20):
        state, m = step(state, got, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]


def test_step_from_top_k_entries_on_one_device_equals_eight():
    features, head, params, batch = _lm(b=8)
    tx = optax.adam(1e-2)
    step = make_distill_step(features, None, tx, student_head=head, chunk_size=4,
                             weighting="posterior", alpha=0.5)
    state = init_train_state(params, tx)
    one = data_parallel_step(step, make_mesh(devices=jax.devices()[:1]))
    eight = data_parallel_step(step, make_mesh())
    s1, m1 = one(state, batch, jax.random.key(0))
    s8, m8 = eight(state, batch, jax.random.key(0))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["teacher_weights"], m8["teacher_weights"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
