"""The transformer family (`mtkd_jax.models.transformer`) against a float64 NumPy reference,
and its properties: causality, packed documents, padding, the tied head, bf16, the chunked
distillation step, the errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtkd_jax.cache import build_cache, open_cache, with_cached_logits
from mtkd_jax.models import nnx_split
from mtkd_jax.models.transformer import (
    Transformer,
    TransformerConfig,
    apply_rope,
    attention_mask,
    preset,
    rope_frequencies,
    segment_positions,
)
from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.teachers import make_stacked_apply
from mtkd_jax.training.batch import check_batch
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step

V = 40

LLAMA = TransformerConfig(
    vocab_size=V, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=48, max_len=64,
    rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=True,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
)
"""Llama 3 options (GQA, llama3 rotary scaling, untied head) plus Qwen2's q/k/v biases."""

GEMMA = TransformerConfig(
    vocab_size=V, dim=32, depth=3, heads=4, kv_heads=1, head_dim=16, mlp_dim=64, max_len=64,
    activation="gelu_tanh", tie_embeddings=True, qk_norm=True, attn_logit_softcap=5.0,
    final_logit_softcap=3.0, embed_scale=True, norm_offset=1.0, post_norms=True,
    query_scale=12.0, sliding_window=3,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    local_rope_theta=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
)
"""Gemma 2/3 options: soft-caps, (1 + w) norms, sqrt(E) embedding, sandwich norms, QK-norm,
query_pre_attn_scalar, sliding layers with their own rotary base, head_dim != E / H, MQA."""

CONFIGS = {"llama": LLAMA, "gemma": GEMMA}


def _randomized(cfg, seed):
    """A model whose every param is random (norm scales around their identity value)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # no eager init ops
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)

    def fresh(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        shape = leaf.shape
        if any("norm" in n for n in names):
            value = 1.0 - cfg.norm_offset + 0.3 * rng.standard_normal(shape)
        elif names[-1] == "embedding":
            value = 0.5 * rng.standard_normal(shape)
        elif names[-1] == "bias":
            value = 0.3 * rng.standard_normal(shape)
        else:  # kernels [in, ...]; the output projection's is [H, D, E]
            fan_in = shape[0] * (shape[1] if names[-2] == "o" else 1)
            value = rng.standard_normal(shape) * fan_in**-0.5
        return jnp.asarray(value, jnp.float32)

    params = jax.tree_util.tree_map_with_path(fresh, params)
    nnx.update(model, params)
    return model


def _jitted(model):
    """`x -> logits` of the model, compiled (eager NNX runs op by op: slow)."""
    fns, params = token_model_fns(model)
    logits = jax.jit(fns.logits)
    return lambda x: logits(params, x)


def _np_params(model):
    """The model's params as a nested dict of float64 NumPy arrays."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), state)


# ----------------------------------------------------------------------------- the reference


def ref_inv_freq(d, theta, scaling):
    inv = theta ** (-np.arange(0, d, 2) / d)
    if scaling is None:
        return inv
    s = dict(scaling)
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    out = []
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                              s["high_freq_factor"], s["factor"])
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def ref_norm(x, w, cfg):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * (cfg.norm_offset + w)


def ref_rope(x, pos, inv):
    """x [L, H, D] at positions [L]."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = (pos * inv[i])[:, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def ref_allowed(length, seg, mask, window):
    """[L, L] bool: query i sees key j."""
    allowed = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(i + 1):
            ok = seg[i] == seg[j] and mask[j] > 0
            if window is not None:
                ok = ok and i - j < window
            allowed[i, j] = ok
    return allowed


def ref_act(x, name):
    if name == "silu":
        return x / (1 + np.exp(-x))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_block(h, p, cfg, layer, pos, seg, mask):
    """One decoder block on one row h [L, E]."""
    sliding = cfg.attention_types[layer] == "sliding_attention"
    a = p["attn"]
    x = ref_norm(h, p["attn_norm"]["scale"], cfg)
    q = np.einsum("le,ehd->lhd", x, a["q"]["kernel"])
    k = np.einsum("le,ehd->lhd", x, a["k"]["kernel"])
    v = np.einsum("le,ehd->lhd", x, a["v"]["kernel"])
    if cfg.qkv_bias:
        q, k, v = q + a["q"]["bias"], k + a["k"]["bias"], v + a["v"]["bias"]
    if cfg.qk_norm:
        q, k = ref_norm(q, a["q_norm"]["scale"], cfg), ref_norm(k, a["k_norm"]["scale"], cfg)
    if sliding and cfg.local_rope_theta is not None:
        inv = ref_inv_freq(cfg.head_dim, cfg.local_rope_theta, None)
    else:
        inv = ref_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q, k = ref_rope(q, pos, inv), ref_rope(k, pos, inv)
    allowed = ref_allowed(len(h), seg, mask, cfg.sliding_window if sliding else None)
    scale = (cfg.query_scale or cfg.head_dim) ** -0.5
    out = np.zeros_like(q)
    for head in range(cfg.heads):
        g = head // (cfg.heads // cfg.kv_heads)
        s = q[:, head] @ k[:, g].T * scale
        if cfg.attn_logit_softcap:
            s = cfg.attn_logit_softcap * np.tanh(s / cfg.attn_logit_softcap)
        s = np.where(allowed, s, -1e300)  # a padded query sees no key: finite
        s = s - s.max(-1, keepdims=True)
        w = np.exp(s)
        out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
    o = np.einsum("lhd,hde->le", out, a["o"]["kernel"])
    if cfg.post_norms:
        o = ref_norm(o, p["attn_post_norm"]["scale"], cfg)
    h = h + o
    x = ref_norm(h, p["mlp_norm"]["scale"], cfg)
    m = p["mlp"]
    y = (ref_act(x @ m["gate"]["kernel"], cfg.activation) * (x @ m["up"]["kernel"])) \
        @ m["down"]["kernel"]
    if cfg.post_norms:
        y = ref_norm(y, p["mlp_post_norm"]["scale"], cfg)
    return h + y


def ref_positions(seg):
    pos = np.zeros(len(seg))
    for i in range(1, len(seg)):
        pos[i] = 0 if seg[i] != seg[i - 1] else pos[i - 1] + 1
    return pos


def ref_model(tokens, p, cfg, seg, mask):
    """Logits [L, V] of one row."""
    emb = p["embed"]["embedding"]
    h = emb[tokens]
    if cfg.embed_scale:
        h = h * float(np.float32(math.sqrt(cfg.dim)))
    pos = ref_positions(seg)
    for layer in range(cfg.depth):
        h = ref_block(h, p["layers"][layer], cfg, layer, pos, seg, mask)
    h = ref_norm(h, p["norm"]["scale"], cfg)
    logits = h @ (emb.T if cfg.tie_embeddings else p["out"]["kernel"])
    if cfg.final_logit_softcap:
        logits = cfg.final_logit_softcap * np.tanh(logits / cfg.final_logit_softcap)
    return logits


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_block_matches_float64_reference(name, rng):
    cfg = CONFIGS[name]
    model = _randomized(cfg, 1)
    p = _np_params(model)
    b, length = 2, 9
    h = rng.standard_normal((b, length, cfg.dim))
    seg = np.array([[0] * 4 + [1] * 5, [2] * 9])
    mask = np.array([[1] * 9, [0, 0] + [1] * 7])
    pos = np.stack([ref_positions(s) for s in seg])
    for layer in range(cfg.depth):
        sliding = cfg.attention_types[layer] == "sliding_attention"
        allowed = attention_mask(length, segment_ids=jnp.asarray(seg), mask=jnp.asarray(mask),
                                 window=cfg.sliding_window if sliding else None)
        graphdef, state = nnx.split(model.layers[layer])
        block = jax.jit(lambda st, *a, g=graphdef: nnx.merge(g, st)(*a))
        got = block(state, jnp.asarray(h, jnp.float32), jnp.asarray(pos), allowed)
        want = np.stack([ref_block(h[i], p["layers"][layer], cfg, layer, pos[i], seg[i],
                                   mask[i]) for i in range(b)])
        real = mask > 0  # padded queries see no key: their output is meaningless
        np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_matches_float64_reference(name, rng):
    cfg = CONFIGS[name]
    model = _randomized(cfg, 2)
    p = _np_params(model)
    tokens = rng.integers(0, V, size=(3, 11))
    seg = np.array([[0] * 11, [5] * 3 + [6] * 6 + [9] * 2, [1] * 11])
    mask = np.array([[1] * 11, [1] * 11, [1] * 8 + [0] * 3])
    x = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
         "mask": jnp.asarray(mask)}
    got = np.asarray(_jitted(model)(x))
    for i in range(3):
        want = ref_model(tokens[i], p, cfg, seg[i], mask[i])
        real = mask[i] > 0
        np.testing.assert_allclose(got[i][real], want[real], rtol=1e-4, atol=1e-4)
    assert got.dtype == np.float32 and got.shape == (3, 11, V)


def test_rope_frequencies_match_reference():
    for scaling in (None, LLAMA.rope_scaling, GEMMA.rope_scaling):
        got = rope_frequencies(16, theta=500000.0, scaling=scaling)
        np.testing.assert_allclose(got, ref_inv_freq(16, 500000.0, scaling), rtol=1e-6)
    scaled = rope_frequencies(16, theta=500000.0, scaling=LLAMA.rope_scaling)
    plain = rope_frequencies(16, theta=500000.0)
    # llama3: the highest frequency is kept, the lowest divided by the factor.
    assert scaled[0] == plain[0] and np.isclose(scaled[-1], plain[-1] / 8)


def test_rope_is_a_relative_rotation(rng):
    """<rope(q, m), rope(k, n)> depends on m - n only, and rope keeps norms."""
    inv = rope_frequencies(8, theta=10000.0)
    q, k = rng.standard_normal((2, 1, 1, 1, 8)).astype(np.float32)
    at = lambda x, pos: apply_rope(jnp.asarray(x), jnp.array([[pos]]), inv)  # noqa: E731
    dots = [float(jnp.sum(at(q, m + 3) * at(k, m))) for m in (0, 5, 17)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(at(q, 11)), np.linalg.norm(q), rtol=1e-6)


def test_segment_positions_restart():
    seg = jnp.array([[3, 3, 4, 4, 4, 7], [0, 0, 0, 0, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal(name, rng):
    """Changing a future token changes no earlier logit (bitwise)."""
    model = _randomized(CONFIGS[name], 3)
    logits = _jitted(model)
    tokens = rng.integers(0, V, size=(2, 10))
    base = np.asarray(logits(jnp.asarray(tokens)))
    for t in (3, 9):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1 + rng.integers(0, V - 1)) % V
        out = np.asarray(logits(jnp.asarray(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_documents_equal_each_document_alone(name, rng):
    model = _jitted(_randomized(CONFIGS[name], 4))
    a, b = rng.integers(0, V, size=6), rng.integers(0, V, size=5)
    packed = model({"tokens": jnp.asarray(np.concatenate([a, b])[None]),
                    "segment_ids": jnp.asarray([[1] * 6 + [2] * 5])})
    alone_a, alone_b = model(jnp.asarray(a[None])), model(jnp.asarray(b[None]))
    np.testing.assert_allclose(packed[0, :6], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 6:], alone_b[0], rtol=1e-5, atol=1e-5)
    # Without segment ids the second document sees the first.
    unpacked = model(jnp.asarray(np.concatenate([a, b])[None]))
    assert not np.allclose(unpacked[0, 6:], alone_b[0], atol=1e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padding_is_invisible(name, rng):
    """With the padding mask (and positions from the first real token), a left-padded row
    gives the unpadded row's logits, whatever the padding tokens are."""
    model = _jitted(_randomized(CONFIGS[name], 5))
    row = rng.integers(0, V, size=7)
    alone = model(jnp.asarray(row[None]))
    for pad in (rng.integers(0, V, size=3), rng.integers(0, V, size=3)):
        x = {"tokens": jnp.asarray(np.concatenate([pad, row])[None]),
             "mask": jnp.asarray([[0] * 3 + [1] * 7]),
             "positions": jnp.asarray([[0] * 3 + list(range(7))])}
        np.testing.assert_allclose(model(x)[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(np.asarray(model(x))))


def test_tied_head_is_embedding_transposed(rng):
    cfg = preset("tiny", vocab_size=V)
    model = _randomized(cfg, 6)
    f = jnp.asarray(rng.standard_normal((2, 3, cfg.dim)), jnp.float32)
    emb = nnx.state(model, nnx.Param)["embed"]["embedding"][...]
    head = nnx.jit(lambda m, f: m.head(f))(model, f)
    np.testing.assert_allclose(head, np.asarray(f) @ np.asarray(emb).T, rtol=1e-5, atol=1e-5)
    assert "out" not in nnx.state(model, nnx.Param)
    untied = nnx.state(_randomized(cfg.replace(tie_embeddings=False), 0), nnx.Param)
    assert untied["out"]["kernel"].shape == (cfg.dim, V)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_close_to_float32(name, rng):
    model = _randomized(CONFIGS[name], 7)
    x = {"tokens": jnp.asarray(rng.integers(0, V, size=(2, 12))),
         "segment_ids": jnp.asarray([[0] * 5 + [1] * 7] * 2)}
    full = np.asarray(_jitted(model)(x))
    for policy in ("mixed_bfloat16", "bfloat16"):
        m, params, state = nnx_split(model, policy=policy)
        logits, _ = jax.jit(lambda p, x, m=m, s=state: m(p, s, x, train=False))(params, x)
        assert logits.dtype == jnp.float32
        err = np.abs(np.asarray(logits) - full).max()
        assert err < 0.1 * np.abs(full).max(), (policy, err)
        assert 0 < err  # really computed in bfloat16
    as_bf16 = nnx.eval_shape(
        lambda: Transformer(CONFIGS[name].replace(dtype=jnp.bfloat16), rngs=nnx.Rngs(0)))
    nnx.update(as_bf16, nnx.state(model, nnx.Param))
    out = _jitted(as_bf16)(x)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - full).max() < 0.1 * np.abs(full).max()


# ----------------------------------------------------------------------------- in the library


def test_distill_step_chunked_equals_unchunked(rng):
    """The transformer as student (features + head, chunked loss) and as online teachers
    (stacked), on packed rows with padding: the chunked step equals the unchunked one."""
    cfg = preset("tiny", vocab_size=V, dim=32, mlp_dim=64)
    fns, params = token_model_fns(_randomized(cfg, 8))
    teachers = [_randomized(cfg.replace(depth=1), 10 + k) for k in range(2)]
    t_model, t_params, t_state = nnx_split(teachers)
    teacher_apply = make_stacked_apply(t_model.eval_apply, strategy="vmap")
    tp = {"params": t_params, "model_state": t_state}
    b, length = 3, 10
    x = {"tokens": jnp.asarray(rng.integers(0, V, size=(b, length))),
         "segment_ids": jnp.asarray([[0] * 4 + [1] * 6, [2] * 10, [0] * 7 + [3] * 3])}
    mask = np.ones((b, length), np.float32)
    mask[2, 7:] = 0
    batch = {"x": x, "y": jnp.asarray(rng.integers(0, V, size=(b, length))),
             "mask": jnp.asarray(mask)}
    check_batch(batch, num_classes=V)
    tx = optax.sgd(0.1)
    state = init_train_state(params, tx)
    options = dict(weighting="entropy", temperature=2.0, alpha=0.3)
    chunked = jax.jit(make_distill_step(fns.features, teacher_apply, tx, student_head=fns.head,
                                        chunk_size=4, **options))
    whole = jax.jit(make_distill_step(fns.logits, teacher_apply, tx, **options))
    s1, m1 = chunked(state, batch, jax.random.key(0), teacher_params=tp)
    s2, m2 = whole(state, batch, jax.random.key(0), teacher_params=tp)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(params)[0])


def test_top_k_cache_of_transformer_teachers_on_packed_rows(tmp_path, rng):
    """Packed rows (dict `x`) go through the sequence cache: built from stacked transformer
    teachers, read back next to the same batches."""
    cfg = preset("tiny", vocab_size=V, dim=32, depth=1, mlp_dim=64)
    t_model, t_params, t_state = nnx_split([_randomized(cfg, 20 + k) for k in range(2)])
    teacher_apply = make_stacked_apply(t_model.eval_apply, strategy="vmap")
    tp = {"params": t_params, "model_state": t_state}
    tokens = rng.integers(0, V, size=(6, 8))
    seg = np.sort(rng.integers(0, 3, size=(6, 8)), axis=1)
    batches = lambda: ({"x": {"tokens": tokens[i:i + 3], "segment_ids": seg[i:i + 3]},  # noqa: E731
                        "index": np.arange(i, i + 3)} for i in (0, 3))
    cache = build_cache(tmp_path, teacher_apply, tp, batches(), num_examples=6, top_k=V - 1,
                        tokenizer="test", progress=False)
    assert (cache.seq_len, cache.num_written) == (8, 6)
    for batch in with_cached_logits(batches(), open_cache(tmp_path, expect_tokenizer="test")):
        want = jax.nn.softmax(teacher_apply(tp, batch["x"]), -1)
        np.testing.assert_allclose(jax.nn.softmax(batch["teacher_logits"], -1), want,
                                   atol=2e-3)


# ----------------------------------------------------------------------------- errors


def test_row_longer_than_rotary_table_is_an_error_at_trace_time():
    model = Transformer(preset("tiny", vocab_size=V, max_len=8), rngs=nnx.Rngs(0))
    fns, params = token_model_fns(model)
    with pytest.raises(ValueError, match="max_len=8"):
        jax.jit(fns.logits)(params, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match=r"`positions` must lie in \[0, 8\)"):
        model(jnp.zeros((1, 3), jnp.int32), positions=jnp.array([[0, 1, 8]]))


def test_decreasing_segment_ids_are_an_error_on_the_host():
    model = Transformer(preset("tiny", vocab_size=V), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 4), jnp.int32)
    bad = jnp.array([[0, 0, 1, 1], [1, 2, 1, 2]])
    with pytest.raises(ValueError, match="row 1 has id 1 at position 2 after id 2"):
        model(tokens, segment_ids=bad)
    with pytest.raises(ValueError, match=r"batch\['x'\]\['segment_ids'\]` must be non-decr"):
        check_batch({"x": {"tokens": tokens, "segment_ids": bad}, "y": tokens})
    # Padding (mask 0) may carry any id; traced ids are not read.
    ok = {"tokens": tokens, "segment_ids": jnp.array([[1, 1, 2, 0], [1, 1, 1, 1]]),
          "mask": jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])}
    check_batch({"x": ok, "y": tokens, "mask": ok["mask"]})
    assert jax.jit(lambda s: model(tokens, segment_ids=s))(bad).shape == (2, 4, V)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "linear"}), r"missing \['factor'\]"),
        (dict(activation="relu"), "`activation` must be one of"),
        (dict(kv_heads=3), "multiple of `kv_heads`"),
        (dict(layer_types=("full_attention",)), "must hold 2 .depth. entries"),
        (dict(layer_types=("full_attention", "sliding_attention")), "`sliding_window` is None"),
        (dict(head_dim=7), "must be even"),
        (dict(attn_logit_softcap=0.0), "`attn_logit_softcap` must be a finite number > 0"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny", vocab_size=V, **changes)


def test_input_errors():
    model = Transformer(preset("tiny", vocab_size=V), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="got keys"):
        model({"tokens": tokens, "segments": tokens})
    with pytest.raises(ValueError, match="both in `x` and as a keyword"):
        model({"tokens": tokens, "mask": tokens}, mask=tokens)
    with pytest.raises(ValueError, match=r"`mask` must have the tokens' shape"):
        model(tokens, mask=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match=r"`tokens` must lie in \[0, 40\)"):
        model(tokens + V)
    with pytest.raises(ValueError, match=r"int array \[B, L\]"):
        model(jnp.zeros((1, 4)))
