"""Token-level distillation: sequence batches `[B, L]` with a padding mask, against float64
NumPy references; chunked = unchunked; 1 device = 8 devices with uneven padding; padding
changes nothing; bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax.objective.loss import (
    chunked_distill_objective,
    chunked_distill_sums,
    distill_sums,
    finish_distill,
    mean_distillation_loss,
)
from mtkd_jax.objective.targets import distill_targets
from mtkd_jax.parallel import data_parallel_step, make_mesh
from mtkd_jax.training.batch import check_batch
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step, make_supervised_step

K, B, L, D, V = 3, 8, 6, 5, 7
T, ALPHA = 2.0, 0.3
KEY = jax.random.key(0)


def _ragged_mask(rng, b=B, length=L):
    lengths = rng.integers(1, length + 1, size=b)
    return (np.arange(length)[None] < lengths[:, None]).astype(np.float32)


@pytest.fixture
def problem(rng):
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32) * 0.5
    zt = (rng.normal(size=(K, B, L, V)) * 2).astype(np.float32)
    y = rng.integers(0, V, size=(B, L)).astype(np.int32)
    mask = _ragged_mask(rng)
    y = np.where(mask > 0, y, -1).astype(np.int32)  # padding holds placeholder labels
    return x, w, zt, y, mask


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(x, w, zt, y, mask):
    """float64 loss and gradient of the masked token-level loss of a linear student."""
    x, w, zt = (a.astype(np.float64) for a in (x, w, zt))
    s = x @ w  # [B, L, V]
    p = np.exp(_np_log_softmax(zt / T))  # [K, B, L, V]
    t = p.mean(0)
    logq = _np_log_softmax(s / T)
    kl = T**2 * np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - logq), 0), -1)
    yy = np.where(mask > 0, y, 0)
    logp = _np_log_softmax(s)
    ce = -np.take_along_axis(logp, yy[..., None], -1)[..., 0]
    n = mask.sum()
    loss = (1 - ALPHA) * (kl * mask).sum() / n + ALPHA * (ce * mask).sum() / n
    dsoft = T * (np.exp(logq) - t)
    dhard = np.exp(logp) - np.eye(V)[yy]
    ds = ((1 - ALPHA) * dsoft + ALPHA * dhard) * mask[..., None] / n
    return loss, np.einsum("bld,blv->dv", x, ds)


def _loss(w, x, zt, y, mask):
    dt = distill_targets(jnp.asarray(zt), temperature=T)
    return mean_distillation_loss(jnp.asarray(x) @ w, dt.targets, y, alpha=ALPHA,
                                  temperature=T, mask=mask).loss


def test_masked_token_loss_and_gradient_match_float64_reference(problem):
    x, w, zt, y, mask = problem
    ref_loss, ref_grad = _reference(*problem)
    loss, grad = jax.jit(jax.value_and_grad(_loss))(w, x, zt, y, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # The step's first SGD update is the same gradient, and its loss the same value.
    tx = optax.sgd(1.0)
    step = jax.jit(make_distill_step(lambda p, x: x @ p, None, tx, temperature=T, alpha=ALPHA))
    state, m = step(init_train_state(jnp.asarray(w), tx),
                    {"x": x, "y": y, "mask": mask, "teacher_logits": zt}, KEY)
    np.testing.assert_allclose(m["loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(w - state.params, ref_grad, rtol=1e-4, atol=1e-6)
    assert m["teacher_weights"].shape == (K,)


def test_sequence_step_equals_classification_step_on_valid_tokens(problem):
    """A [B, L] batch is the L-less case: the valid tokens as rows of a [N, C] batch give
    the same loss, metrics and update (per-token confidence weights included)."""
    x, w, zt, y, mask = problem
    keep = mask.reshape(-1) > 0
    rows = {"x": x.reshape(-1, D)[keep], "y": y.reshape(-1)[keep],
            "teacher_logits": zt.reshape(K, -1, V)[:, keep]}
    tx = optax.sgd(0.5)
    step = jax.jit(make_distill_step(lambda p, x: x @ p, None, tx, temperature=T, alpha=ALPHA,
                                     weighting="confidence"))
    state = init_train_state(jnp.asarray(w), tx)
    seq, ms = step(state, {"x": x, "y": y, "mask": mask, "teacher_logits": zt}, KEY)
    flat, mf = step(state, rows, KEY)
    np.testing.assert_allclose(seq.params, flat.params, rtol=1e-5, atol=1e-6)
    for name in ("loss", "soft_loss", "hard_loss", "teacher_weights", "teacher_divergence",
                 "agreement", "accuracy"):
        np.testing.assert_allclose(ms[name], mf[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_padding_changes_nothing(problem, rng):
    """Random student inputs, teacher logits and labels at padded positions: same loss and
    gradient."""
    x, w, zt, y, mask = problem
    pad = mask == 0
    x2 = np.where(pad[..., None], rng.normal(size=x.shape) * 50, x).astype(np.float32)
    zt2 = np.where(pad[None, ..., None], rng.normal(size=zt.shape) * 50, zt).astype(np.float32)
    y2 = np.where(pad, rng.integers(-5, 3 * V, size=y.shape), y).astype(np.int32)
    f = jax.jit(jax.value_and_grad(_loss))
    a, b = f(w, x, zt, y, mask), f(w, x2, zt2, y2, mask)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-7)


def _head(p, f):
    return f @ p["head"]


def _features(p, x):
    return jnp.tanh(x @ p["body"])


@pytest.mark.parametrize("chunk", [4, 6])
def test_chunked_equals_unchunked(problem, chunk):
    """Loss and gradient of the chunked loss (4 does not divide L=6: the last chunk
    overlaps) equal the unchunked ones to 1e-6; online teacher heads chunked too."""
    x, _, zt, y, mask = problem
    rng = np.random.default_rng(3)
    p = {"body": rng.normal(size=(D, 4)).astype(np.float32),
         "head": rng.normal(size=(4, V)).astype(np.float32)}
    tf = rng.normal(size=(K, B, L, 3)).astype(np.float32)
    tw = rng.normal(size=(K, 3, V)).astype(np.float32)
    t_head = lambda tw, f: jnp.einsum("kblh,khv->kblv", f, tw)  # noqa: E731
    opts = dict(temperature=T, weighting="entropy", mask=mask)

    def full(p):
        s = distill_sums(_head(p, _features(p, x)), t_head(tw, tf), y, **opts)
        parts, m = finish_distill(s, alpha=ALPHA)
        return parts.loss, m

    def chunked(p):
        s = chunked_distill_sums(_features(p, x), _head, p, tf, t_head, tw, y,
                                 chunk_size=chunk, **opts)
        parts, m = finish_distill(s, alpha=ALPHA)
        return parts.loss, m

    (la, ma), ga = jax.jit(jax.value_and_grad(full, has_aux=True))(p)
    (lb, mb), gb = jax.jit(jax.value_and_grad(chunked, has_aux=True))(p)
    np.testing.assert_allclose(lb, la, rtol=1e-6, atol=1e-6)
    for name in ("body", "head"):
        np.testing.assert_allclose(gb[name], ga[name], rtol=1e-6, atol=1e-6)
    for name in ma:
        np.testing.assert_allclose(mb[name], ma[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("chunk,per_token", [(4, False), (2, True)])
def test_gradient_in_the_forward_pass_equals_the_recomputed_one(problem, chunk, per_token):
    """`chunked_distill_objective` (each chunk's backward run in the forward pass) against
    `chunked_distill_sums` (checkpointed, recomputed): the same J = s * soft + h * hard, the
    same gradient for the head's params and for the features, the same sums; a params leaf
    the head does not read gets exactly zero."""
    x, _, _, y, mask = problem
    rng = np.random.default_rng(5)
    p = {"head": rng.normal(size=(4, V)).astype(np.float32),
         "unread": rng.normal(size=(3,)).astype(np.float32)}
    f = rng.normal(size=(B, L, 4)).astype(np.float32)
    tf = rng.normal(size=(K, B, L, 3)).astype(np.float32)
    tw = rng.normal(size=(K, 3, V)).astype(np.float32)
    t_head = lambda tw, f: jnp.einsum("kblh,khv->kblv", f, tw)  # noqa: E731
    label_mask = (rng.random((B, L) if per_token else B) < 0.7).astype(np.float32)
    opts = dict(temperature=T, weighting="confidence", mask=mask, label_mask=label_mask,
                chunk_size=chunk)
    s_scale, h_scale = float(rng.uniform(0.1, 1)), float(rng.uniform(0.1, 1))

    def fused(p, f):
        return chunked_distill_objective(f, _head, p, tf, t_head, tw, y, soft_scale=s_scale,
                                         hard_scale=h_scale, **opts)

    def recomputed(p, f):
        sums = chunked_distill_sums(f, _head, p, tf, t_head, tw, y, **opts)
        return s_scale * sums.loss.soft + h_scale * sums.loss.hard, sums

    (va, sa), ga = jax.jit(jax.value_and_grad(recomputed, (0, 1), has_aux=True))(p, f)
    (vb, sb), gb = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))(p, f)
    np.testing.assert_allclose(vb, va, rtol=1e-6)
    np.testing.assert_allclose(gb[0]["head"], ga[0]["head"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb[1], ga[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(gb[0]["unread"], np.zeros(3, np.float32))
    assert float(np.abs(ga[1]).max()) > 1e-3  # the features' gradient is not trivially 0
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # The sums carry no gradient: only J does.
    g_sums = jax.grad(lambda p: fused(p, f)[1].loss.soft)(p)
    assert float(np.abs(g_sums["head"]).max()) == 0.0


def test_chunked_step_equals_unchunked_step(problem):
    x, _, zt, y, mask = problem
    rng = np.random.default_rng(4)
    p = {"body": rng.normal(size=(D, 4)).astype(np.float32),
         "head": rng.normal(size=(4, V)).astype(np.float32)}
    tx = optax.adam(1e-2)
    batch = {"x": x, "y": y, "mask": mask, "teacher_logits": zt}
    plain = make_distill_step(lambda p, x: _head(p, _features(p, x)), None, tx, alpha=ALPHA)
    chunk = make_distill_step(_features, None, tx, alpha=ALPHA, student_head=_head,
                              chunk_size=4)
    sa, ma = jax.jit(plain)(init_train_state(p, tx), batch, KEY)
    sb, mb = jax.jit(chunk)(init_train_state(p, tx), batch, KEY)
    for a, b in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(ma) == set(mb)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


def _uneven_batch(rng):
    """Device d (of 8, one sequence each) holds d // 2 valid tokens or more: very uneven."""
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    zt = (rng.normal(size=(K, B, L, V)) * 2).astype(np.float32)
    y = rng.integers(0, V, size=(B, L)).astype(np.int32)
    lengths = np.array([1, 6, 2, 6, 6, 1, 3, 5])
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    mask[5] = 0.0  # one device holds padding only
    mask[5, 0] = 0.0
    return {"x": x, "y": y, "mask": mask, "teacher_logits": zt}


@pytest.mark.parametrize("mode,chunked", [("jit", False), ("shard_map", False),
                                           ("jit", True), ("shard_map", True)])
def test_one_device_equals_eight_with_uneven_padding(rng, mode, chunked):
    batch = _uneven_batch(rng)
    w = jnp.asarray(rng.normal(size=(D, V)).astype(np.float32))
    tx = optax.adam(0.05)
    axis = None if mode == "jit" else "data"

    def make(axis_name):
        if chunked:  # the loss's factors from the global counts, psum'ed over `axis_name`
            return make_distill_step(lambda p, x: x, None, tx, temperature=T, alpha=ALPHA,
                                     weighting="confidence", axis_name=axis_name,
                                     student_head=lambda p, f: f @ p, chunk_size=4)
        return make_distill_step(lambda p, x: x @ p, None, tx, temperature=T, alpha=ALPHA,
                                 weighting="confidence", axis_name=axis_name)

    one = data_parallel_step(make(None), make_mesh(devices=jax.devices()[:1]))
    eight = data_parallel_step(make(axis), make_mesh(), mode=mode)
    sa = sb = init_train_state(w, tx)
    for _ in range(2):
        sa, ma = one(sa, batch, KEY)
        sb, mb = eight(sb, batch, KEY)
    np.testing.assert_allclose(sa.params, sb.params, rtol=1e-5, atol=1e-6)
    for name in ma:
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_supervised_sequence_step_is_masked_token_ce(problem):
    x, w, _, y, mask = problem
    tx = optax.sgd(1.0)
    _, m = jax.jit(make_supervised_step(lambda p, x: x @ p, tx))(
        init_train_state(jnp.asarray(w), tx), {"x": x, "y": y, "mask": mask}, KEY)
    logp = _np_log_softmax(x.astype(np.float64) @ w)
    yy = np.where(mask > 0, y, 0)
    ce = -np.take_along_axis(logp, yy[..., None], -1)[..., 0]
    np.testing.assert_allclose(m["loss"], (ce * mask).sum() / mask.sum(), rtol=1e-5)
    acc = ((logp.argmax(-1) == yy) * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)


def test_token_metrics_match_reference(problem):
    x, w, zt, y, mask = problem
    teachers = lambda tp, x: jnp.asarray(zt)  # noqa: E731
    step = make_eval_step(lambda p, x: x @ p, teachers)
    batch = {"x": x, "y": y, "mask": mask}
    r = evaluate(step, jnp.asarray(w), [batch, batch], teacher_params=())
    logp = _np_log_softmax(x.astype(np.float64) @ w)
    yy = np.where(mask > 0, y, 0)
    nll = (-np.take_along_axis(logp, yy[..., None], -1)[..., 0] * mask).sum() / mask.sum()
    ens = np.exp(_np_log_softmax(zt.astype(np.float64))).mean(0)
    agree = ((logp.argmax(-1) == ens.argmax(-1)) * mask).sum() / mask.sum()
    s = r["student"]
    np.testing.assert_allclose(s["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(s["perplexity"], np.exp(nll), rtol=1e-5)
    np.testing.assert_allclose(s["agreement"], agree, rtol=1e-6)
    assert s["n"] == 2 * mask.sum()
    assert set(r) == {"student", "teacher_0", "teacher_1", "teacher_2", "ensemble"}
    assert r["ensemble"]["agreement"] == 1.0


def test_bad_sequence_inputs(problem):
    x, w, zt, y, mask = problem
    tx = optax.sgd(0.1)
    step = make_distill_step(lambda p, x: x @ p, None, tx, alpha=ALPHA)
    state = init_train_state(jnp.asarray(w), tx)
    good = {"x": x, "y": y, "mask": mask, "teacher_logits": zt}
    with pytest.raises(ValueError, match=r"batch\['mask'\].*\[B, L\] with B=8"):
        step(state, {**good, "mask": mask[:4]}, KEY)
    with pytest.raises(ValueError, match=r"batch\['mask'\].*\[B, L\]"):
        step(state, {**good, "mask": mask[:, 0]}, KEY)
    with pytest.raises(ValueError, match=r"batch\['mask'\]` has shape \(8, 6\) but "
                                         r"`batch\['y'\]` \(8, 5\)"):
        step(state, {**good, "y": y[:, :5]}, KEY)
    with pytest.raises(ValueError, match=r"teacher_logits.*\[K, B, L, V\]"):
        step(state, {**good, "teacher_logits": zt[:, :, :5]}, KEY)
    with pytest.raises(ValueError, match="all-padding"):
        check_batch({**good, "mask": np.zeros_like(mask)})
    with pytest.raises(ValueError, match=r"batch\['mask'\]` must hold 0 \(padding\) or 1"):
        check_batch({**good, "mask": -mask})
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        check_batch({**good, "y": np.where(mask > 0, V, -1)}, num_classes=V)
    check_batch(good, num_classes=V)  # placeholder labels at padding are fine
    with pytest.raises(ValueError, match="chunk_size"):
        make_distill_step(_features, None, tx, student_head=_head, chunk_size=0)
    with pytest.raises(ValueError, match="student_head.*sequence batch"):
        make_distill_step(_features, None, tx, student_head=_head)(
            state, {"x": x[:, 0], "teacher_logits": zt[:, :, 0]}, KEY)


def test_codistill_sequence_step_equals_flattened_valid_tokens(problem):
    from mtkd_jax.training.state import init_stacked_train_state
    from mtkd_jax.training.steps import make_codistill_step

    x, w, _, y, mask = problem
    keep = mask.reshape(-1) > 0
    tx = optax.sgd(0.5)
    step = jax.jit(make_codistill_step(lambda p, x: x @ p, tx, alpha=ALPHA, temperature=T))
    state = init_stacked_train_state(jnp.stack([jnp.asarray(w), -jnp.asarray(w)]), tx)
    seq, ms = step(state, {"x": x, "y": y, "mask": mask}, KEY)
    flat, mf = step(state, {"x": x.reshape(-1, D)[keep], "y": y.reshape(-1)[keep]}, KEY)
    np.testing.assert_allclose(seq.params, flat.params, rtol=1e-5, atol=1e-6)
    for name in ("loss", "model_loss", "divergence", "accuracy"):
        np.testing.assert_allclose(ms[name], mf[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _chunked_temp_bytes(k, b, length, v, h, chunk, top_k=None):
    """XLA's temporary bytes of the compiled chunked distill step (compiled, not run), with
    precomputed teacher logits or (`top_k`) top-k entries expanded per chunk on the device."""
    from mtkd_jax.cache import expand_top_k

    sd = jax.ShapeDtypeStruct
    tx = optax.sgd(0.1)
    kw = dict(student_head=lambda p, f: f @ p["head"], chunk_size=chunk, temperature=2.0,
              alpha=0.5)
    features = lambda p, x: jnp.tanh(x @ p["body"])  # noqa: E731
    params = {"body": sd((h, h), jnp.float32), "head": sd((h, v), jnp.float32)}
    batch = {"x": sd((b, length, h), jnp.float32), "y": sd((b, length), jnp.int32),
             "mask": sd((b, length), jnp.float32)}
    extra = {}
    if top_k is None:
        step = make_distill_step(features, None, tx, **kw)
        batch["teacher_logits"] = sd((k, b, length, v), jnp.float32)
    else:
        def expand(_, z):
            return expand_top_k(z[..., :top_k], z[..., top_k:2 * top_k].astype(jnp.int32),
                                z[..., 2 * top_k], num_classes=v)

        step = make_distill_step(features, lambda tp, x: tp, tx, teacher_head=expand, **kw)
        extra["teacher_params"] = sd((k, b, length, 2 * top_k + 1), jnp.float32)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    compiled = jax.jit(step).lower(state, batch, key, **extra).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_step_holds_about_one_chunk_of_teacher_logits():
    # The chunked step's temporaries stay a few times one chunk's (K + 2) * B * c * V
    # float32, whatever L: measured 2.5x (precomputed logits) and 3.5x (a top-k cache expanded
    # per chunk) at these sizes (1.8x and 2.8x at V = 128k, benchmarks/RESULTS.md). Before
    # issue 26 they were 3.9x and 35x here: the unnormalised softmax, the weighted teacher
    # products, an elementwise isfinite and the top-k one-hot `[..., k, V]` each added
    # `[K, B, c, V]`-sized buffers.
    k, b, length, v, h, c = 4, 2, 256, 4096, 32, 32
    one_chunk = (k + 2) * b * c * v * 4
    assert _chunked_temp_bytes(k, b, length, v, h, c) <= 3 * one_chunk
    assert _chunked_temp_bytes(k, b, length, v, h, c, top_k=16) <= 5 * one_chunk
