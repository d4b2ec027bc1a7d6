"""Sequence teacher cache (top-k per token, tokenizer fingerprint), the procedural token
source and the causal token model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtkd_jax.cache import build_cache, open_cache, with_cached_logits
from mtkd_jax.data import text
from mtkd_jax.models.zoo.token import CausalTokenModel, token_model_fns

V = 12


@pytest.fixture(scope="module")
def data():
    source = text.make_source(vocab_size=V, seed=3)
    return source, text.sample_split(source, 10, max_len=7, min_len=2, seed=1)


def _teachers(tp, x):  # [K, B, L, V] from token ids [B, L]
    return jnp.einsum("blv,kvw->kblw", jax.nn.one_hot(x, V), tp)


def test_cache_round_trip_top_k_per_token(tmp_path, data, rng):
    source, split = data
    tp = jnp.asarray(rng.normal(size=(2, V, V)) * 3, jnp.float32)
    fp = text.vocab_fingerprint(source.vocab)
    cache = build_cache(tmp_path, _teachers, tp, text.batches(split, batch_size=4,
                        drop_remainder=False), num_examples=len(split), top_k=V - 1,
                        tokenizer=fp, progress=False)
    assert (cache.seq_len, cache.tokenizer, cache.num_written) == (7, fp, 10)
    top = cache.lookup_top_k(np.array([3, 0]))
    assert top.log_probs.shape == (2, 2, 7, V - 1) and top.log_probs.dtype == np.float16
    assert top.classes.shape == (2, 2, 7, V - 1) and top.log_rest.shape == (2, 2, 7)
    # Read back through the batch stream: the teachers' distributions to float16 precision
    # (k = V - 1: the uniform fill gives the one missing class its exact mass).
    reopened = open_cache(tmp_path, expect_tokenizer=fp)
    for batch in with_cached_logits(text.batches(split, batch_size=4), reopened):
        want = jax.nn.softmax(_teachers(tp, batch["x"]), -1)
        got = jax.nn.softmax(batch["teacher_logits"], -1)
        assert batch["teacher_logits"].shape == (2, 4, 7, V)
        np.testing.assert_allclose(got, want, atol=2e-3)


def test_cache_refuses_other_tokenization_and_teachers(tmp_path, data, rng):
    source, split = data
    tp = jnp.asarray(rng.normal(size=(2, V, V)), jnp.float32)
    build_cache(tmp_path, _teachers, tp, text.batches(split, batch_size=5), num_examples=10,
                top_k=3, tokenizer=text.vocab_fingerprint(source.vocab), progress=False)
    other = text.vocab_fingerprint(text.make_source(vocab_size=V + 1).vocab)
    with pytest.raises(ValueError, match="another tokenization"):
        open_cache(tmp_path, expect_tokenizer=other)
    with pytest.raises(ValueError, match="other teachers"):
        open_cache(tmp_path, expect_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="`tokenizer` is for sequence caches"):
        build_cache(tmp_path / "c", lambda tp, x: _teachers(tp, x)[:, :, 0], tp,
                    text.batches(split, batch_size=5), num_examples=10, tokenizer="t",
                    progress=False)


def test_text_source_is_deterministic_and_ragged(data):
    source, split = data
    again = text.sample_split(text.make_source(vocab_size=V, seed=3), 10, max_len=7,
                              min_len=2, seed=1)
    np.testing.assert_array_equal(split.x, again.x)
    lengths = split.mask.sum(1)
    assert lengths.min() >= 2 and lengths.max() <= 7 and len(set(lengths)) > 1
    np.testing.assert_array_equal(split.x[:, 1:], split.y[:, :-1])  # next-token task
    # EOS ends each sequence at its last valid label; padding after it.
    last = lengths.astype(int) - 1
    assert np.all(split.y[np.arange(10), last] == text.EOS)
    assert np.all(split.y[split.mask == 0] == text.PAD)
    assert np.all(split.x[:, 0] == text.BOS)


def test_token_model_is_causal():
    fns, params = token_model_fns(CausalTokenModel(V, dim=8, depth=2, context=3,
                                                   rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(2, 9)), jnp.int32)
    x2 = x.at[:, 5:].set((x[:, 5:] + 1) % V)  # change the future from position 5 on
    a, b = fns.logits(params, x), fns.logits(params, x2)
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_top_k_keeps_the_label_with_its_exact_log_probability(rng):
    from mtkd_jax.cache import top_k_of_logits
    from tests.helpers import np_log_softmax

    k, c = 3, 9
    z = rng.normal(size=(2, 4, 5, c)) * 2  # [K, B, L, C]
    y = rng.integers(0, c, size=(4, 5))
    top = top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k, keep=jnp.asarray(y))
    logp = np_log_softmax(z.astype(np.float64))
    order = np.argsort(-logp, axis=-1)
    for idx in np.ndindex(*z.shape[:-1]):
        label = y[idx[1:]]
        want = list(order[idx][:k])
        if label not in want:
            want[-1] = label
        got = top.classes[idx].tolist()
        assert got == want
        np.testing.assert_allclose(top.log_probs[idx], logp[idx][want], atol=1e-5)
        rest = 1 - np.exp(logp[idx][want]).sum()
        np.testing.assert_allclose(np.exp(top.log_rest[idx]), rest, atol=1e-5)
    # Without `keep`: the plain top-k.
    plain = top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k)
    assert np.array_equal(plain.classes, order[..., :k])
    with pytest.raises(ValueError, match="keep"):
        top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k, keep=jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="keep"):
        top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k, keep=jnp.zeros((4, 5)))


def test_cache_with_labels_gives_the_online_posterior_weights(tmp_path, data, rng):
    from mtkd_jax.weighting import get_weighting

    source, split = data
    tp = jnp.asarray(rng.normal(size=(3, V, V)) * 3, jnp.float32)
    batches = list(text.batches(split, batch_size=4, drop_remainder=False))
    kwargs = dict(num_examples=len(split), top_k=2, dtype=np.float32, progress=False)
    with_y = build_cache(tmp_path / "y", _teachers, tp, batches, keep_labels=True, **kwargs)
    plain = build_cache(tmp_path / "plain", _teachers, tp, batches, **kwargs)
    posterior = get_weighting("posterior")
    errors = {}
    for name, cache in (("labels", with_y), ("plain", plain)):
        worst = 0.0
        for b in with_cached_logits(batches, cache):
            z_online = _teachers(tp, jnp.asarray(b["x"]))
            y, m = jnp.asarray(b["y"]), jnp.asarray(b["mask"])
            w_online = posterior(jax.nn.softmax(z_online), logits=z_online, labels=y,
                                 label_mask=m)
            z = jnp.asarray(b["teacher_logits"])
            w = posterior(jax.nn.softmax(z), logits=z, labels=y, label_mask=m)
            worst = max(worst, float(jnp.max(jnp.abs(w - w_online) * m)))
        errors[name] = worst
    assert errors["labels"] < 1e-5 < 0.05 < errors["plain"]
    with pytest.raises(ValueError, match="top_k"):
        build_cache(tmp_path / "z", _teachers, tp, batches, keep_labels=True,
                    num_examples=len(split), progress=False)
    with pytest.raises(ValueError, match="batch\\['y'\\]"):
        build_cache(tmp_path / "z", _teachers, tp, [{k: v for k, v in b.items() if k != "y"}
                    for b in batches], keep_labels=True, **kwargs)


def test_prior_fill_spreads_the_tail_by_the_prior(tmp_path, data, rng):
    from mtkd_jax.cache import expand_top_k, top_k_of_logits
    from tests.helpers import np_softmax

    c, k = 10, 3
    z = rng.normal(size=(2, 4, c)) * 2
    prior = rng.uniform(0.1, 1.0, size=c)
    top = top_k_of_logits(jnp.asarray(z, jnp.float32), top_k=k)
    got = jax.nn.softmax(expand_top_k(top.log_probs, top.classes, top.log_rest, num_classes=c,
                                      fill="prior", prior=prior))
    p, pi = np_softmax(z.astype(np.float64)), prior / prior.sum()
    want = np.zeros_like(p)
    for idx in np.ndindex(*z.shape[:-1]):
        stored = np.asarray(top.classes[idx])
        rest = np.setdiff1d(np.arange(c), stored)
        want[idx][stored] = p[idx][stored]
        want[idx][rest] = p[idx][rest].sum() * pi[rest] / pi[rest].sum()
    np.testing.assert_allclose(got, want, atol=1e-6)
    # A uniform prior is the uniform fill.
    uniform = expand_top_k(top.log_probs, top.classes, top.log_rest, num_classes=c)
    flat = expand_top_k(top.log_probs, top.classes, top.log_rest, num_classes=c, fill="prior",
                        prior=np.ones(c))
    np.testing.assert_allclose(flat, uniform, atol=1e-5)
    # Through the cache: the host lookup equals the jit expansion.
    source, split = data
    tp = jnp.asarray(rng.normal(size=(2, V, V)) * 3, jnp.float32)
    batches = list(text.batches(split, batch_size=4, drop_remainder=False))
    build_cache(tmp_path, _teachers, tp, batches, num_examples=len(split), top_k=4,
                dtype=np.float32, progress=False)
    prior_v = rng.uniform(0.1, 1.0, size=V)
    cache = open_cache(tmp_path, fill="prior", prior=prior_v)
    top_v = cache.lookup_top_k(np.array([1, 2]))
    np.testing.assert_allclose(
        cache.lookup(np.array([1, 2])),
        expand_top_k(top_v.log_probs, top_v.classes, top_v.log_rest, num_classes=V,
                     fill="prior", prior=prior_v), atol=1e-5)
    with pytest.raises(ValueError, match="needs `prior`"):
        open_cache(tmp_path, fill="prior")
    with pytest.raises(ValueError, match="`prior` must be"):
        open_cache(tmp_path, fill="prior", prior=np.ones(V + 1))
    with pytest.raises(ValueError, match="`prior` is for fill='prior'"):
        open_cache(tmp_path, prior=np.ones(V))
