"""Tests for mtkd_jax.cache: exact round trips, top-k reconstruction against a float64
reference, the cached distill step against the online one, streaming, and refusals."""

import functools
import inspect
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax import cache as mc
from mtkd_jax.core.divergence import softmax_t
from mtkd_jax.training.checkpoint import params_fingerprint
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step

K, D, C = 3, 6, 10


def linear_teachers(tp, x):
    """K linear teachers `[K, C, D]` -> logits `[K, B, C]`."""
    return jnp.einsum("kcd,bd->kbc", tp, x)


@pytest.fixture
def setup(rng):
    n = 50
    tp = jnp.asarray(rng.normal(size=(K, C, D)) * 3, jnp.float32)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = rng.integers(0, C, size=n).astype(np.int32)
    return tp, x, y


def split_batches(x, y, *, batch_size, rng, views=None):
    """Shuffled batches covering every example once (the last one partial)."""
    order = rng.permutation(len(x))
    for s in range(0, len(x), batch_size):
        i = order[s : s + batch_size]
        batch = {"x": x[i], "y": y[i], "index": i.astype(np.int64)}
        if views is not None:
            batch["view"] = np.full(len(i), views)
        yield batch


def build(path, tp, x, y, rng, **kwargs):
    kwargs.setdefault("progress", False)
    batches = split_batches(x, y, batch_size=16, rng=rng)
    return mc.build_cache(path, linear_teachers, tp, batches, num_examples=len(x), **kwargs)


def test_full_logits_round_trip_exact(tmp_path, setup, rng):
    tp, x, y = setup
    cache = build(tmp_path / "f32", tp, x, y, rng, dtype=np.float32)
    index = rng.permutation(len(x))[:20]
    want = np.asarray(linear_teachers(tp, jnp.asarray(x[index])))
    got = mc.open_cache(tmp_path / "f32").lookup(index)
    assert got.dtype == np.float32 and got.shape == (K, 20, C)
    np.testing.assert_array_equal(got, want)
    assert cache.num_written == len(x) and cache.header["num_examples"] == len(x)
    assert cache.bytes_per_example == K * C * 4 + 1

    half = build(tmp_path / "f16", tp, x, y, rng)  # default float16
    np.testing.assert_array_equal(half.lookup(index), want.astype(np.float16).astype(np.float32))
    assert half.bytes_per_example == K * C * 2 + 1


def _topk_reference(z, k, temperature, fill, prior=None):
    """float64: the teacher distribution at T restricted to its top-k (module docstring)."""
    z = np.asarray(z, np.float64)
    top = np.argsort(-z, axis=-1)[..., :k]
    in_top = np.zeros(z.shape, bool)
    np.put_along_axis(in_top, top, True, axis=-1)
    p1 = np.exp(z - z.max(-1, keepdims=True))
    p1 /= p1.sum(-1, keepdims=True)
    if fill == "renormalize":
        q = np.where(in_top, p1 ** (1.0 / temperature), 0.0)
    else:
        rest = 1.0 - np.sum(np.where(in_top, p1, 0.0), -1, keepdims=True)
        pi = np.ones(z.shape[-1]) if prior is None else np.asarray(prior, np.float64)
        pi_out = np.where(in_top, 0.0, pi / pi.sum())
        base = np.where(in_top, p1, rest * pi_out / pi_out.sum(-1, keepdims=True))
        q = base ** (1.0 / temperature)
    return q / q.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float16, 3e-3)])
@pytest.mark.parametrize("fill", mc.FILLS)
def test_top_k_reconstruction_matches_float64(tmp_path, setup, rng, dtype, tol, fill):
    tp, x, y = setup
    k = 4
    build(tmp_path, tp, x, y, rng, top_k=k, dtype=dtype)
    prior = rng.uniform(0.2, 1.0, size=C) if fill == "prior" else None
    cache = mc.open_cache(tmp_path, fill=fill, prior=prior)
    index = np.arange(len(x))
    z = np.asarray(linear_teachers(tp, jnp.asarray(x)), np.float64)
    logits = cache.lookup(index)
    for temperature in (1.0, 4.0):
        got = np.asarray(softmax_t(jnp.asarray(logits), temperature=temperature))
        want = _topk_reference(z, k, temperature, fill, prior)
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
        if fill == "renormalize":  # exactly zero outside the top-k
            assert np.all((got > 0).sum(-1) == k)
    # The compact entries, expanded on the device, give the same logits as the host lookup.
    top = cache.lookup_top_k(index)
    assert top.log_probs.shape == top.classes.shape == (K, len(x), k)
    assert top.classes.dtype == np.int16 and top.log_rest.shape == (K, len(x))
    on_device = jax.jit(functools.partial(mc.expand_top_k, num_classes=C, fill=fill,
                                          prior=prior))(*top)
    np.testing.assert_allclose(np.asarray(on_device), logits, rtol=1e-6, atol=1e-6)
    itemsize = np.dtype(dtype).itemsize
    assert cache.bytes_per_example == K * k * (itemsize + 2) + K * itemsize + 1


def test_cached_step_equals_online_step(tmp_path, setup, rng):
    tp, x, y = setup
    cache = build(tmp_path, tp, x, y, rng, dtype=np.float32)
    student = lambda p, xb: xb @ p
    tx = optax.sgd(0.05, momentum=0.9)
    kw = dict(weighting="confidence", temperature=4.0, alpha=0.5)
    online = jax.jit(make_distill_step(student, linear_teachers, tx, **kw))
    cached = jax.jit(make_distill_step(student, None, tx, **kw))
    s_on = s_ca = init_train_state(jnp.asarray(rng.normal(size=(D, C)), jnp.float32), tx)
    key = jax.random.key(0)
    batches = list(split_batches(x, y, batch_size=16, rng=rng))[:3]
    for batch, fed in zip(batches, mc.with_cached_logits(batches, cache), strict=True):
        xy = {"x": batch["x"], "y": batch["y"]}
        s_on, m_on = online(s_on, xy, key, teacher_params=tp)
        s_ca, m_ca = cached(s_ca, {**xy, "teacher_logits": fed["teacher_logits"]}, key)
        for name in m_on:
            np.testing.assert_allclose(m_ca[name], m_on[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s_ca.params, s_on.params, rtol=1e-6, atol=1e-7)


def test_top_k_equal_to_c_is_the_full_distribution(tmp_path, setup, rng):
    tp, x, y = setup
    cache = build(tmp_path, tp, x, y, rng, top_k=C, dtype=np.float32)
    z = linear_teachers(tp, jnp.asarray(x))
    got = softmax_t(jnp.asarray(cache.lookup(np.arange(len(x)))), temperature=2.0)
    np.testing.assert_allclose(got, softmax_t(z, temperature=2.0), rtol=1e-5, atol=1e-7)


def test_views_are_cached_separately(tmp_path, setup, rng):
    tp, x, y = setup
    noisy = x + 1.0  # the second "augmented view" of every example

    def both_views():
        yield from split_batches(x, y, batch_size=16, rng=rng, views=0)
        yield from split_batches(noisy, y, batch_size=16, rng=rng, views=1)

    cache = mc.build_cache(
        tmp_path,
        linear_teachers,
        tp,
        both_views(),
        num_examples=len(x),
        num_views=2,
        dtype=np.float32,
        progress=False,
    )
    index, view = np.array([3, 3, 7]), np.array([0, 1, 1])
    want = np.stack(
        [
            linear_teachers(tp, jnp.asarray(x[3:4]))[:, 0],
            linear_teachers(tp, jnp.asarray(noisy[3:4]))[:, 0],
            linear_teachers(tp, jnp.asarray(noisy[7:8]))[:, 0],
        ],
        axis=1,
    )
    # Each (index, view) reads its own row: the views differ by O(1), the build (batches of
    # 16) and the reference (one row) by float32 rounding at most.
    np.testing.assert_allclose(cache.lookup(index, view), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pass `view`"):
        cache.lookup(index)
    with pytest.raises(ValueError, match=r"`view` must be integers in \[0, 2\)"):
        cache.lookup(index, 2)


def test_shards_are_read_together(tmp_path, setup, rng):
    tp, x, y = setup
    n = len(x)
    for p, rows in enumerate((np.arange(0, n, 2), np.arange(1, n, 2))):
        batch = {"x": x[rows], "index": rows}
        mc.build_cache(
            tmp_path,
            linear_teachers,
            tp,
            [batch],
            num_examples=n,
            shard=f"p{p}",
            dtype=np.float32,
            progress=False,
        )
    cache = mc.open_cache(tmp_path)
    assert cache.shards == ["p0", "p1"] and cache.num_written == n
    index = rng.permutation(n)[:17]
    np.testing.assert_array_equal(
        cache.lookup(index), np.asarray(linear_teachers(tp, jnp.asarray(x[index])))
    )
    only = mc.open_cache(tmp_path, shards=["p0"])
    with pytest.raises(ValueError, match="not in the cache"):
        only.lookup(np.array([0, 1]))


def test_builder_streams(tmp_path, rng):
    """The builder holds at most two batches, and resident memory does not track the file.

    The builder's working set (two batches in flight, their host copies, allocator slack) is
    a constant 19-26 MB on this machine whatever the file size, so the file is large (288 MB)
    and the bound (a fifth of it) is twice that working set and a fifth of what a builder
    keeping its rows grows by.
    """
    n, b, c = 240_000, 2_000, 100
    peak = [0]
    tp = jnp.asarray(rng.normal(size=(K, c, D)), jnp.float32)
    x = rng.normal(size=(b, D)).astype(np.float32)
    alive = []

    def batches():
        for s in range(0, n, b):
            batch = {"x": x + s, "index": np.arange(s, s + b)}
            alive.append(weakref.ref(batch["index"]))
            held = sum(r() is not None for r in alive[:-1])
            assert held <= 2, f"the builder holds {held} earlier batches"
            peak[0] = max(peak[0], rss_bytes())
            yield batch

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # Warm up (compile) on the same shapes, so the measurement sees only the writing.
    mc.build_cache(
        tmp_path / "warm",
        linear_teachers,
        tp,
        [{"x": x, "index": np.arange(b)}],
        num_examples=b,
        dtype=np.float32,
        progress=False,
    )
    before = rss_bytes()
    cache = mc.build_cache(
        tmp_path / "big",
        linear_teachers,
        tp,
        batches(),
        num_examples=n,
        dtype=np.float32,
        progress=False,
    )
    grown = max(peak[0], rss_bytes()) - before  # the peak while writing, not only the end
    file_bytes = os.path.getsize(tmp_path / "big" / "values.npy")
    assert file_bytes > n * K * c * 4
    assert grown < file_bytes / 5, (grown, file_bytes)
    assert cache.num_written == n and len(alive) == n // b


def test_refusals(tmp_path, setup, rng):
    tp, x, y = setup
    build(tmp_path / "a", tp, x, y, rng, top_k=2)
    fp = params_fingerprint(tp)
    assert mc.open_cache(tmp_path / "a", expect_fingerprint=fp).top_k == 2
    assert mc.open_cache(tmp_path / "a", expect_fingerprint=fp["sha256"]).top_k == 2
    with pytest.raises(ValueError, match="built from other teachers"):
        mc.open_cache(tmp_path / "a", expect_fingerprint=params_fingerprint(tp + 1))
    with pytest.raises(ValueError, match="already exists"):
        build(tmp_path / "a", tp, x, y, rng)
    for bad in (0, C + 1, True, 2.5):
        with pytest.raises(ValueError, match=r"`top_k` must be"):
            build(tmp_path / f"k{bad}", tp, x, y, rng, top_k=bad)
    with pytest.raises(ValueError, match=r"`fill` must be one of"):
        mc.open_cache(tmp_path / "a", fill="zeros")
    with pytest.raises(FileNotFoundError, match="No teacher cache"):
        mc.open_cache(tmp_path / "nothing")
    with pytest.raises(
        ValueError, match=r"batch\['index'\] values must be in \[0, num_examples=5\)"
    ):
        mc.build_cache(
            tmp_path / "b",
            linear_teachers,
            tp,
            [{"x": x, "index": np.arange(50)}],
            num_examples=5,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"'index'"):
        mc.build_cache(
            tmp_path / "c", linear_teachers, tp, [{"x": x}], num_examples=50, progress=False
        )
    # Built over part of the split only: the rest is refused, not read as zeros.
    part = mc.build_cache(
        tmp_path / "d",
        linear_teachers,
        tp,
        [{"x": x[:10], "index": np.arange(10)}],
        num_examples=50,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"1 of the requested examples are not in the cache"):
        part.lookup(np.array([3, 10]))
    with pytest.raises(ValueError, match=r"`index` values must be in \[0, 50\)"):
        part.lookup(np.array([50]))


def test_top_k_of_logits_matches_float64(rng):
    z = rng.normal(size=(K, 7, C)) * 4
    top = jax.jit(functools.partial(mc.top_k_of_logits, top_k=3))(jnp.asarray(z, jnp.float32))
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.sort(-log_p, axis=-1)[..., :3]
    np.testing.assert_allclose(top.log_probs, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(top.classes, np.argsort(-z, axis=-1)[..., :3])
    rest = 1.0 - np.exp(want).sum(-1)
    np.testing.assert_allclose(top.log_rest, np.log(rest), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_top_k_rest_mass_counts_ties_and_the_kept_label(top_k):
    """The mass outside an entry is 1 - the stored mass (float64) when values tie at the
    k-th place and when the kept label is swapped in, tied or not."""
    z = np.array([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]] * 4, np.float32)
    keep = np.array([4, 2, 5, 0])  # below, tied with, below and above the k-th value
    p = np.exp(z[0].astype(np.float64))
    p /= p.sum()
    for kept in (None, keep):
        top = mc.top_k_of_logits(jnp.asarray(z), top_k=top_k,
                                 keep=None if kept is None else jnp.asarray(kept))
        for i in range(4):
            cls = np.asarray(top.classes[i])
            assert len(set(cls.tolist())) == top_k
            if kept is not None:
                assert kept[i] in cls
            np.testing.assert_allclose(np.exp(np.float64(top.log_rest[i])),
                                       1.0 - p[cls].sum(), rtol=1e-5, atol=1e-7)


def _dense(top, num_classes):
    """float64 `[..., C]` probabilities of a `TopK`'s slots (slots at TOP_K_FILL are 0)."""
    lp = np.asarray(top.log_probs, np.float64)
    p = np.where(lp <= mc.TOP_K_FILL, 0.0, np.exp(lp))
    out = np.zeros(lp.shape[:-1] + (num_classes,))
    np.put_along_axis(out, np.asarray(top.classes), p, axis=-1)
    return out


def test_tail_samples_are_unbiased_within_r_over_m(rng):
    """Sampled tail slots (systematic sampling): per draw each class's estimate is within
    r / m of its float64 probability (r the tail's mass), every class with m w_c >= 1 is
    drawn, the k + m slots hold distinct classes summing to 1, the first k are the plain
    top-k entry, and over many keys the estimates average to the distribution."""
    k, m, c = 4, 6, 40
    z = rng.normal(size=(K, 5, c)) * 2.5
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 2000)
    draw = jax.jit(jax.vmap(lambda key: mc.top_k_of_logits(
        jnp.asarray(z, jnp.float32), top_k=k, tail_samples=m, key=key)))
    top = draw(keys)
    plain = mc.top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k)
    np.testing.assert_array_equal(top.classes[:, ..., :k],
                                  np.broadcast_to(plain.classes, top.classes[..., :k].shape))
    cls = np.sort(np.asarray(top.classes), axis=-1)
    assert (cls[..., 1:] != cls[..., :-1]).all()
    dense = _dense(top, c)
    np.testing.assert_allclose(dense.sum(-1), 1.0, atol=2e-6)
    r = 1.0 - np.take_along_axis(p, np.asarray(plain.classes), -1).sum(-1)  # [K, 5]
    assert np.all(np.abs(dense - p) <= (r / m)[..., None] * (1 + 1e-4) + 1e-6)
    tail = p.copy()
    np.put_along_axis(tail, np.asarray(plain.classes), 0.0, axis=-1)
    sure = m * tail / r[..., None] >= 1.0
    assert sure.any() and np.all(dense[:, sure] > 0)
    # The mean of 2000 draws: each within r / m of p, so the mean within 5 sigma of it.
    bound = 5 * (r / m)[..., None] / np.sqrt(len(keys)) + 1e-6
    assert np.all(np.abs(dense.mean(0) - p) <= bound)
    assert np.all(np.asarray(top.log_rest) == mc.TOP_K_FILL)  # no ties: the slots hold all


def test_tail_samples_keep_the_label_and_the_tie_mass():
    """With a kept label and ties at the k-th value, the slots plus the rest still sum to 1
    (ties are left to the rest, not sampled) and the label's probability is exact."""
    z = np.array([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0, -2.0, 0.5]] * 4, np.float32)
    keep = np.array([4, 2, 5, 0])
    p = np.exp(z[0].astype(np.float64))
    p /= p.sum()
    top = mc.top_k_of_logits(jnp.asarray(z), top_k=2, keep=jnp.asarray(keep), tail_samples=3,
                             key=jax.random.key(0))
    dense = _dense(top, z.shape[-1])
    np.testing.assert_allclose(dense.sum(-1) + np.exp(np.float64(top.log_rest)), 1.0,
                               atol=1e-6)
    np.testing.assert_allclose(dense[np.arange(4), keep], p[keep], rtol=1e-5)
    # Every class tied (a teacher with a zero head): nothing to sample, and the unused
    # slots still hold classes the entry did not store.
    for k, m in ((2, 3), (3, 5), (1, 7)):
        for kept in (None, jnp.asarray([7, 0, 3, 4])):
            flat = mc.top_k_of_logits(jnp.zeros((4, 8)), top_k=k, keep=kept, tail_samples=m,
                                      key=jax.random.key(1))
            cls = np.sort(np.asarray(flat.classes), axis=-1)
            assert (cls[..., 1:] != cls[..., :-1]).all(), (k, m, flat.classes)
            np.testing.assert_allclose(
                _dense(flat, 8).sum(-1) + np.exp(np.float64(flat.log_rest)), 1.0, atol=1e-6)


def test_a_cache_with_tail_samples(tmp_path, setup, rng):
    """`build_cache(tail_samples=m)`: k + m slots per entry, summing to 1; each example draws
    with its own key, so the stored entries do not depend on the batches; the header, the
    byte count and the refusals."""
    tp, x, y = setup
    kw = dict(top_k=3, tail_samples=4, key=jax.random.key(7), keep_labels=True,
              dtype=np.float32, progress=False)
    a = mc.build_cache(tmp_path / "a", linear_teachers, tp,
                       split_batches(x, y, batch_size=16, rng=rng), num_examples=len(x), **kw)
    b = mc.build_cache(tmp_path / "b", linear_teachers, tp,
                       split_batches(x, y, batch_size=7, rng=rng), num_examples=len(x), **kw)
    index = np.arange(len(x))
    ta, tb = a.lookup_top_k(index), b.lookup_top_k(index)
    assert ta.classes.shape == (K, len(x), 7) and (a.top_k, a.tail_samples) == (3, 4)
    np.testing.assert_array_equal(ta.classes, tb.classes)
    np.testing.assert_allclose(ta.log_probs, tb.log_probs, rtol=1e-6, atol=1e-6)
    assert "top_k=3+4 sampled" in repr(a)
    assert a.bytes_per_example == K * 7 * (4 + 2) + K * 4 + 1
    # Read back expanded (the uniform fill): the slots are the whole distribution.
    probs = np.asarray(jax.nn.softmax(jnp.asarray(a.lookup(index)), axis=-1), np.float64)
    np.testing.assert_allclose(probs, _dense(ta, C), atol=1e-6)
    assert (ta.classes[..., :3] == y[None, :, None]).any(-1).all()  # the label: exact slots
    for bad, match in ((dict(key=None), r"pass `key`"),
                       (dict(top_k=None, keep_labels=False), r"is for top-k caches"),
                       (dict(tail_samples=8),
                        r"`top_k` \+ `tail_samples` \(3 \+ 8\) must be <= C=10"),
                       (dict(tail_samples=-1), r"`tail_samples` must be an integer >= 0")):
        with pytest.raises(ValueError, match=match):
            mc.build_cache(tmp_path / "bad", linear_teachers, tp,
                           split_batches(x, y, batch_size=16, rng=rng),
                           num_examples=len(x), **{**kw, **bad})


def test_one_default_fill():
    """`open_cache`, `expand_top_k` and `build_cache_in_parallel` read back alike by default."""
    for fn in (mc.open_cache, mc.expand_top_k, mc.build_cache_in_parallel):
        assert inspect.signature(fn).parameters["fill"].default == mc.DEFAULT_FILL
    assert mc.DEFAULT_FILL in mc.FILLS


def test_parallel_build_on_one_process(tmp_path, setup, rng):
    tp, x, y = setup
    batches = split_batches(x, y, batch_size=16, rng=rng)
    cache = mc.build_cache_in_parallel(
        tmp_path, linear_teachers, tp, batches, num_examples=len(x), top_k=3, progress=False
    )
    assert cache.shards == ["p0"] and cache.fill == mc.DEFAULT_FILL
    assert cache.num_written == len(x)
    with pytest.raises(ValueError, match="`shard` is set by build_cache_in_parallel"):
        mc.build_cache_in_parallel(
            tmp_path / "s", linear_teachers, tp, [], num_examples=len(x), shard="p1"
        )
    # A bad `fill` is refused before the teachers run, not after the build.
    with pytest.raises(ValueError, match=r"`fill` must be one of"):
        mc.build_cache_in_parallel(
            tmp_path / "f", linear_teachers, tp, [], num_examples=len(x), fill="zeros"
        )
    assert not (tmp_path / "f").exists()


def _nan_teachers(tp, x):
    z = linear_teachers(tp, x)
    return z.at[1, 0, 2].set(jnp.nan)


BAD_BUILDS = {
    "nan logits": (
        dict(teacher_apply=_nan_teachers),
        ValueError,
        r"`teacher_apply` gave NaN or inf logits .* batch\['index'\]",
    ),
    "nan logits, top-k": (
        dict(teacher_apply=_nan_teachers, top_k=2),
        ValueError,
        r"`teacher_apply` gave NaN or inf",
    ),
    "float16 overflow": (
        dict(teacher_apply=lambda tp, x: 1e5 * linear_teachers(tp, x)),
        ValueError,
        r"overflow `dtype`=float16",
    ),
    "logits [B, K, C]": (
        dict(teacher_apply=lambda tp, x: jnp.swapaxes(linear_teachers(tp, x), 0, 1)),
        ValueError,
        r"`teacher_apply` must return logits \[K, B, C\] with B=16",
    ),
    "classes change": (
        dict(
            teacher_apply=lambda tp, x: linear_teachers(tp, x)[..., : 5 + x.shape[0] % 2],
            batches=lambda x: [
                {"x": x[:16], "index": np.arange(16)},
                {"x": x[16:33], "index": np.arange(16, 33)},
            ],
        ),
        ValueError,
        r"`teacher_apply` gave K=3 teachers and C=6 classes, earlier K=3 and C=5",
    ),
    "empty batch": (
        dict(batches=lambda x: [{"x": x[:0], "index": np.arange(0)}]),
        ValueError,
        r"batch\['x'\] must be a non-empty batch",
    ),
    "no batches": (dict(batches=lambda x: []), ValueError, r"`batches` is empty"),
    "one dict": (
        dict(batches=lambda x: {"x": x, "index": np.arange(len(x))}),
        TypeError,
        r"`batches` must be an iterable of batch dicts",
    ),
    "float index": (
        dict(batches=lambda x: [{"x": x, "index": np.arange(len(x), dtype=np.float32)}]),
        ValueError,
        r"batch\['index'\] must be \[B\]=\(50,\) integers",
    ),
    "view shape": (
        dict(batches=lambda x: [{"x": x, "index": np.arange(50), "view": np.zeros(3, int)}]),
        ValueError,
        r"batch\['view'\] must be a scalar or \[B\]",
    ),
    "float view": (
        dict(batches=lambda x: [{"x": x, "index": np.arange(50), "view": 0.0}]),
        ValueError,
        r"batch\['view'\] must be integers",
    ),
    "num_views": (dict(num_views=0), ValueError, r"`num_views` must be an int >= 1"),
    "num_examples": (dict(num_examples=2.0), ValueError, r"`num_examples` must be an int >= 1"),
    "dtype bfloat16": (dict(dtype="bfloat16"), ValueError, r"`dtype` must be float16 or"),
    "dtype int": (dict(dtype=np.int32), ValueError, r"`dtype` must be float16 or float32"),
    "meta": (dict(meta={"f": print}), TypeError, r"`meta` must be JSON-serialisable"),
    "fingerprint": (
        dict(fingerprint={"sha256": b"x"}),
        TypeError,
        r"`fingerprint` must be JSON-serialisable",
    ),
    "shard": (dict(shard="p/0"), ValueError, r"`shard` must be None or a non-empty name"),
}


@pytest.mark.parametrize("case", BAD_BUILDS)
def test_bad_builds_name_the_argument(tmp_path, setup, case):
    tp, x, y = setup
    kwargs, error, match = BAD_BUILDS[case]
    kwargs = dict(kwargs)
    teacher_apply = kwargs.pop("teacher_apply", linear_teachers)
    batches = kwargs.pop("batches", lambda x: [{"x": x[:16], "index": np.arange(16)}])(x)
    kwargs.setdefault("num_examples", len(x))
    with pytest.raises(error, match=match):
        mc.build_cache(tmp_path, teacher_apply, tp, batches, progress=False, **kwargs)
    assert not list(tmp_path.glob("cache*.json")), "a refused build left a readable cache"


def test_bad_reads_name_the_argument(tmp_path, setup, rng):
    tp, x, y = setup
    cache = build(tmp_path, tp, x, y, rng, top_k=2)
    with pytest.raises(ValueError, match=r"`expect_fingerprint` must be a fingerprint dict"):
        mc.open_cache(tmp_path, expect_fingerprint={"names": None})
    with pytest.raises(TypeError, match=r"`expect_fingerprint` must be a fingerprint dict"):
        mc.open_cache(tmp_path, expect_fingerprint=123)
    with pytest.raises(TypeError, match=r"`shards` must be a list of shard names"):
        mc.open_cache(tmp_path, shards="p0")
    with pytest.raises(ValueError, match=r"`index` must be a 1-D integer array"):
        cache.lookup(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"`view` must be integers in \[0, 1\)"):
        cache.lookup(np.array([0, 1, 2]), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"`view` must be integers in \[0, 1\)"):
        cache.lookup(np.array([0, 1]), 0.0)
    with pytest.raises(ValueError, match=r"each batch of `batch_iter` must be a dict with 'index'"):
        next(mc.with_cached_logits([{"x": x}], cache))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(classes=np.array([2.0, 0.0])), TypeError, r"`classes` must be integer"),
        (dict(classes=np.array([2, 4])), ValueError, r"`classes` must be in \[0, num_classes=4\)"),
        (dict(classes=np.array([-1, 0])), ValueError, r"`classes` must be in \[0, num_classes"),
        (dict(classes=np.array([2, 2])), ValueError, r"`classes` must be distinct"),
        (dict(num_classes=0), ValueError, r"`num_classes` must be an int >= 1"),
        (dict(num_classes=1), ValueError, r"`top_k` must be in \[1, C=1\]"),
        (dict(log_rest=None), ValueError, r"needs `log_rest` of shape \(\)"),
        (dict(fill="zeros"), ValueError, r"`fill` must be one of"),
    ],
)
def test_expand_top_k_refusals(kwargs, error, match):
    args = dict(
        log_probs=np.log(np.array([0.6, 0.2], np.float32)),
        classes=np.array([2, 0]),
        log_rest=np.log(np.float32(0.2)),
        num_classes=4,
    )
    with pytest.raises(error, match=match):
        mc.expand_top_k(**{**args, **kwargs})


def test_expand_top_k_under_jit_checks_the_dtype_only():
    """Traced classes are not read (no host sync); their dtype is still checked."""
    expand = jax.jit(functools.partial(mc.expand_top_k, num_classes=4, fill="renormalize"))
    z = expand(jnp.log(jnp.array([0.6, 0.2])), jnp.array([2, 0]))
    np.testing.assert_allclose(jax.nn.softmax(z), [0.25, 0.0, 0.75, 0.0], atol=1e-6)
    with pytest.raises(TypeError, match=r"`classes` must be integer"):
        expand(jnp.log(jnp.array([0.6, 0.2])), jnp.array([2.0, 0.0]))


@pytest.mark.parametrize(
    "index, view, error, match",
    [
        (np.array([0.0, 1.0, 2.0]), 0, TypeError, r"`index` must be integers"),
        (np.array([0, 1]), 0, ValueError, r"`index` must be \[B\] with B=3"),
        (np.arange(3), 0.5, TypeError, r"`view` must be integers"),
        (np.arange(3), np.zeros(2, int), ValueError, r"`view` must be a scalar or \[B\]"),
    ],
)
def test_augment_view_refusals(index, view, error, match):
    noise = lambda k, x: x + jax.random.normal(k, x.shape)
    with pytest.raises(error, match=match):
        mc.augment_view(noise, jax.random.key(0), jnp.zeros((3, 2)), index, view)


def test_jax_array_batches(tmp_path, setup):
    """Batches of jax arrays (e.g. straight from an augmentation) cache like numpy ones."""
    tp, x, y = setup
    batches = [{"x": jnp.asarray(x[s : s + 20]), "index": jnp.arange(s, s + 20)} for s in (0, 20)]
    batches.append({"x": jnp.asarray(x[40:]), "index": jnp.arange(40, 50)})
    cache = mc.build_cache(
        tmp_path, linear_teachers, tp, batches, num_examples=50, dtype=np.float32, progress=False
    )
    np.testing.assert_array_equal(
        cache.lookup(np.arange(50)), np.asarray(linear_teachers(tp, jnp.asarray(x)))
    )


def test_a_truncated_cache_file_names_the_file_and_the_sizes(tmp_path, setup, rng):
    """A cache file cut short (a copy that did not finish): the file, the cache and the
    expected and actual sizes are named (was numpy's "mmap length is greater than file
    size")."""
    tp, x, y = setup
    build(tmp_path, tp, x, y, rng, dtype=np.float32)
    values = tmp_path / "values.npy"
    size = values.stat().st_size
    with open(values, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=rf"values\.npy.*cache in {tmp_path}.*{size} bytes.*"
                                         rf"{size - 100}"):
        mc.open_cache(tmp_path)
