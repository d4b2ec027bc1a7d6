"""Train steps checked by hand: fixed-logit teachers, a linear student, float64 references;
K models at once (`stacked_step`); a weighting registered outside the package; evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from mtkd_jax import data, weighting
from mtkd_jax.core.losses import distillation_loss
from mtkd_jax.objective.targets import distill_targets
from mtkd_jax.training.batch import check_batch
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.state import init_stacked_train_state, init_train_state
from mtkd_jax.training.steps import (
    make_codistill_step,
    make_distill_step,
    make_supervised_step,
    stacked_step,
)

K, B, D, C = 3, 8, 5, 4
KEY = jax.random.key(0)


# ----------------------------------------------------------------------------- float64 reference
def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _softmax(z):
    return np.exp(_log_softmax(z))


def _reference(params, x, tl, y, mask, *, temperature, alpha, soft_loss, weighting):
    """Loss, gradient and metrics of one distill step, by hand in float64."""
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    x = np.asarray(x, np.float64)
    s = x @ w + b  # [B, C]
    t_ = temperature
    p = _softmax(np.asarray(tl) / t_)  # [K, B, C]
    kk, bb = p.shape[:2]
    ens = _softmax(tl).mean(0).argmax(-1)
    y_w = np.where(mask > 0, y, ens)  # labels for the weighting
    if weighting == "confidence":
        ce = -_log_softmax(tl)[:, np.arange(bb), y_w]  # [K, B]
        e = np.exp(ce - ce.max(0))
        weights = (1 - e / e.sum(0)) / (kk - 1)
    else:
        weights = np.full((kk, bb), 1 / kk)
    target = np.einsum("kb,kbc->bc", weights, p)
    q = _softmax(s / t_)
    if soft_loss == "kl":
        soft = t_**2 * np.sum(target * (np.log(target) - np.log(q)), -1)
        dsoft = t_ * (q - target)
    else:
        soft = np.sum((q - target) ** 2, -1)
        g = 2 * (q - target)
        dsoft = (q * g - q * np.sum(q * g, -1, keepdims=True)) / t_
    logp = _log_softmax(s)
    y0 = np.where(mask > 0, y, 0)
    hard = -logp[np.arange(bb), y0]
    n_lab = mask.sum()
    loss = (1 - alpha) * soft.mean() + alpha * np.sum(mask * hard) / n_lab
    onehot = np.eye(s.shape[1])[y0]
    ds = (1 - alpha) * dsoft / bb + alpha * (mask / n_lab)[:, None] * (np.exp(logp) - onehot)
    grads = {"w": x.T @ ds, "b": ds.sum(0)}
    div = ((p[:, None] - p[None, :]) ** 2).sum(-1).mean(-1)  # [K, K]
    metrics = {
        "loss": loss,
        "soft_loss": soft.mean(),
        "hard_loss": np.sum(mask * hard) / n_lab,
        "teacher_weights": weights.mean(1),
        "teacher_divergence": div,
        "agreement": np.mean(s.argmax(-1) == target.argmax(-1)),
        "accuracy": np.sum(mask * (s.argmax(-1) == y0)) / n_lab,
    }
    return grads, metrics


def _linear(params, x):
    return x @ params["w"] + params["b"]


def _problem(rng, *, unlabeled=3):
    params = {
        "w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(C,)) * 0.1, jnp.float32),
    }
    x = rng.normal(size=(B, D)).astype(np.float32)
    tl = (rng.normal(size=(K, B, C)) * 2).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    mask = np.ones(B, np.float32)
    mask[:unlabeled] = 0.0
    y[:unlabeled] = -1  # unlabeled transfer-set examples carry a placeholder label
    return params, {"x": x, "y": y, "label_mask": mask}, tl


@pytest.mark.parametrize(
    "soft_loss,weighting,temperature,alpha",
    [("kl", "confidence", 2.0, 0.3), ("mse", "uniform", 1.5, 0.6)],
)
def test_distill_step_by_hand(rng, soft_loss, weighting, temperature, alpha):
    params, batch, tl = _problem(rng)
    lr = 0.5
    tx = optax.sgd(lr)
    fixed = jnp.asarray(tl)
    step = jax.jit(
        make_distill_step(
            _linear, lambda tp, x: fixed, tx, weighting=weighting, soft_loss=soft_loss,
            temperature=temperature, alpha=alpha,
        )
    )
    state, m = step(init_train_state(params, tx), batch, KEY, teacher_params=())
    grads, want = _reference(
        params, batch["x"], tl, batch["y"], batch["label_mask"], temperature=temperature,
        alpha=alpha, soft_loss=soft_loss, weighting=weighting,
    )
    assert int(state.step) == 1
    for name in ("w", "b"):
        np.testing.assert_allclose(
            np.asarray(state.params[name]), np.asarray(params[name]) - lr * grads[name],
            rtol=1e-5, atol=1e-6, err_msg=name,
        )
    for name, v in want.items():
        np.testing.assert_allclose(np.asarray(m[name]), v, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(m["teacher_logits_finite"]) == 1.0


def test_precomputed_teacher_logits_give_the_same_step(rng):
    """The cache path (teacher_apply=None, batch['teacher_logits']) is the same step."""
    params, batch, tl = _problem(rng)
    tx = optax.adam(1e-2)
    kw = dict(weighting="confidence", temperature=3.0, alpha=0.5)
    live = jax.jit(make_distill_step(_linear, lambda tp, x: tp, tx, **kw))
    cached = jax.jit(make_distill_step(_linear, None, tx, **kw))
    s1 = s2 = init_train_state(params, tx)
    for _ in range(2):
        s1, m1 = live(s1, batch, KEY, teacher_params=jnp.asarray(tl))
        s2, m2 = cached(s2, {**batch, "teacher_logits": tl}, KEY)
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_distill_targets_match_step_and_core(rng):
    _, batch, tl = _problem(rng)
    dt = distill_targets(
        jnp.asarray(tl), jnp.asarray(batch["y"]), temperature=2.0, weighting="confidence",
        label_mask=jnp.asarray(batch["label_mask"]),
    )
    p = _softmax(tl / 2.0)
    np.testing.assert_allclose(np.asarray(dt.probs), p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dt.weights).sum(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(dt.targets), np.einsum("kb,kbc->bc", np.asarray(dt.weights), p), atol=1e-6
    )


def test_label_mask(rng):
    params, batch, tl = _problem(rng, unlabeled=4)
    tx = optax.sgd(0.1)
    step = jax.jit(make_distill_step(_linear, None, tx, alpha=0.5, weighting="confidence"))
    state = init_train_state(params, tx)
    batch = {**batch, "teacher_logits": tl}
    s1, m1 = step(state, batch, KEY)
    # What unlabeled examples claim as a label must not matter.
    other = {**batch, "y": np.where(batch["label_mask"] > 0, batch["y"], 2).astype(np.int32)}
    s2, m2 = step(state, other, KEY)
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every example labeled: the step's loss is the mean of the core's distillation_loss.
    full = {**batch, "y": rng.integers(0, C, size=B).astype(np.int32), "label_mask": np.ones(B)}
    _, m3 = step(state, full, KEY)
    dt = distill_targets(jnp.asarray(tl), jnp.asarray(full["y"]), weighting="confidence")
    want = distillation_loss(_linear(params, full["x"]), dt.targets, full["y"], alpha=0.5)
    np.testing.assert_allclose(float(m3["loss"]), float(jnp.mean(want)), rtol=1e-6)


def test_codistill_k2_equals_mutual_distillation(rng):
    """Uniform K=2 codistillation: each model is distilled toward the other's current output."""

    def mlp(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def init(seed):
        r = np.random.default_rng(seed)
        shapes = {"w1": (D, 6), "b1": (6,), "w2": (6, C), "b2": (C,)}
        return {k: jnp.asarray(r.normal(size=s) * 0.5, jnp.float32) for k, s in shapes.items()}

    models = [init(1), init(2)]
    tx = optax.adam(0.05)
    kw = dict(soft_loss="kl", temperature=2.0, alpha=0.3)
    co = jax.jit(make_codistill_step(mlp, tx, **kw))
    one = jax.jit(make_distill_step(mlp, lambda tp, x: mlp(tp, x)[None], tx, **kw))
    stacked = init_stacked_train_state(jax.tree.map(lambda *a: jnp.stack(a), *models), tx)
    singles = [init_train_state(p, tx) for p in models]
    _, batch, _ = _problem(rng)
    for _ in range(3):
        stacked, m = co(stacked, batch, KEY)
        new0, m0 = one(singles[0], batch, KEY, teacher_params=singles[1].params)
        new1, m1 = one(singles[1], batch, KEY, teacher_params=singles[0].params)
        singles = [new0, new1]
        np.testing.assert_allclose(
            np.asarray(m["model_loss"]), [float(m0["loss"]), float(m1["loss"])], rtol=1e-6
        )
    for i, s in enumerate(singles):
        for name in s.params:
            np.testing.assert_allclose(
                np.asarray(stacked.params[name][i]), np.asarray(s.params[name]),
                rtol=1e-6, atol=1e-6, err_msg=f"model {i} {name}",
            )


def test_supervised_step_learns(rng):
    x = rng.normal(size=(32, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D, C))).argmax(-1).astype(np.int32)  # linearly separable
    tx = optax.sgd(0.5)
    step = jax.jit(make_supervised_step(_linear, tx))
    state = init_train_state({"w": jnp.zeros((D, C)), "b": jnp.zeros(C)}, tx)
    losses = []
    for _ in range(40):
        state, m = step(state, {"x": x, "y": y}, KEY)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(np.log(C), rel=1e-5)
    assert losses[-1] < 0.5 * losses[0] and float(m["accuracy"]) > 0.9
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False))


def test_per_step_key_reaches_apply(rng):
    """pass_key: the model gets fold_in(key, state.step), the step's only fold."""

    def noisy(p, x, key):
        return x @ p + jax.random.normal(key, (x.shape[0], C))

    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    tx = optax.sgd(0.0)
    step = jax.jit(make_supervised_step(noisy, tx, pass_key=True))
    w = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
    state = init_train_state(w, tx)._replace(step=jnp.int32(5))
    _, m = step(state, {"x": x, "y": y}, KEY)
    logits = noisy(w, x, jax.random.fold_in(KEY, 5))
    want = -_log_softmax(logits)[np.arange(B), y].mean()
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)


def test_evaluate_side_by_side(rng):
    n = 12
    x = rng.normal(size=(2 * n, D)).astype(np.float32)
    y = rng.integers(0, C, size=2 * n).astype(np.int32)
    tl = rng.normal(size=(K, 2 * n, C)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
    batches = [
        {"x": x[i : i + n], "y": y[i : i + n], "teacher_logits": tl[:, i : i + n]}
        for i in (0, n)
    ]
    report = evaluate(make_eval_step(lambda p, x: x @ p), w, batches)
    assert sorted(report) == ["ensemble", "student", "teacher_0", "teacher_1", "teacher_2"]
    ens = _softmax(tl).mean(0)
    preds = {
        "student": (x @ np.asarray(w)).argmax(-1),
        **{f"teacher_{k}": tl[k].argmax(-1) for k in range(K)},
        "ensemble": ens.argmax(-1),
    }
    for name, pred in preds.items():
        got = report[name]
        assert got["n"] == 2 * n
        np.testing.assert_allclose(got["accuracy"], skm.accuracy_score(y, pred), rtol=1e-6)
        f1 = skm.f1_score(y, pred, average="macro", zero_division=0)
        np.testing.assert_allclose(got["f1"], f1, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["agreement"], np.mean(pred == ens.argmax(-1)), rtol=1e-6)
    nll = -np.log(ens[np.arange(2 * n), y]).mean()
    np.testing.assert_allclose(report["ensemble"]["nll"], nll, rtol=1e-5)


# ------------------------------------------------------------------------------------ bad input
def test_class_count_mismatch():
    tx = optax.sgd(0.1)
    params = {"w": jnp.zeros((D, C + 1)), "b": jnp.zeros(C + 1)}
    step = make_distill_step(_linear, lambda tp, x: jnp.zeros((K, x.shape[0], C)), tx)
    batch = {"x": np.zeros((B, D), np.float32), "y": np.zeros(B, np.int32)}
    with pytest.raises(ValueError, match="student predicts 5 classes but the teachers 4"):
        jax.jit(step)(init_train_state(params, tx), batch, KEY, teacher_params=())
    with pytest.raises(ValueError, match="share the class count"):
        make_eval_step(_linear)(params, {**batch, "teacher_logits": np.zeros((K, B, C))})


def test_labels_out_of_range_are_caught_on_the_host():
    bad = {
        "x": np.zeros((2, D), np.float32), "y": np.array([0, C], np.int32),
        "teacher_logits": np.zeros((K, 2, C), np.float32),
    }
    with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, 4\).*found \[4\]"):
        check_batch(bad, num_classes=C)
    with pytest.raises(ValueError, match=r"`batch\['y'\]` labels must be in \[0, C\).*\[-1\]"):
        check_batch({**bad, "y": np.array([0, -1], np.int32)})
    # A placeholder label on an unlabeled example is fine.
    assert check_batch({**bad, "label_mask": np.array([1.0, 0.0])}, num_classes=C) == 2
    with pytest.raises(ValueError, match="teacher_logits.*4 classes.*num_classes=3"):
        check_batch({**bad, "y": np.array([0, 1], np.int32)}, num_classes=3)
    with pytest.raises(ValueError, match=r"`batch\['label_mask'\]` must be finite and >= 0"):
        check_batch({**bad, "label_mask": np.array([1.0, -1.0])})


def test_bad_arguments():
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="Unknown weighting 'best'"):
        make_distill_step(_linear, None, tx, weighting="best")
    with pytest.raises(ValueError, match="soft_loss"):
        make_distill_step(_linear, None, tx, soft_loss="l1")
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        make_codistill_step(_linear, tx, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        make_distill_step(_linear, None, tx, temperature=0.0)
    with pytest.raises(ValueError, match="divergence_kind"):
        make_distill_step(_linear, None, tx, divergence_kind="cosine")
    params = {"w": jnp.zeros((D, C)), "b": jnp.zeros(C)}
    state = init_train_state(params, tx)
    x = np.zeros((B, D), np.float32)
    with pytest.raises(ValueError, match="must hold precomputed 'teacher_logits'"):
        make_distill_step(_linear, None, tx)(state, {"x": x}, KEY)
    with pytest.raises(ValueError, match="needs labels"):
        make_distill_step(_linear, None, tx, alpha=0.5)(
            state, {"x": x, "teacher_logits": np.zeros((K, B, C), np.float32)}, KEY
        )
    with pytest.raises(ValueError, match=r"must have shape \[K, B, C\] with B=8"):
        make_distill_step(_linear, None, tx)(
            state, {"x": x, "teacher_logits": np.zeros((K, B + 1, C), np.float32)}, KEY
        )
    with pytest.raises(ValueError, match="needs K >= 2"):
        stacked = init_stacked_train_state(jax.tree.map(lambda a: a[None], params), tx)
        make_codistill_step(_linear, tx)(stacked, {"x": x}, KEY)
    with pytest.raises(ValueError, match="disagree on the leading teacher axis"):
        init_stacked_train_state({"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}, tx)
    with pytest.raises(ValueError, match=r"`batch` must be a dict \{'x': \[B, ...\]"):
        make_supervised_step(_linear, tx)(state, {"y": np.zeros(B, np.int32)}, KEY)
    with pytest.raises(ValueError, match="`batches` is empty"):
        evaluate(make_eval_step(_linear), params, [])


# ------------------------------------------------------------------- K models, augmentation
def test_stacked_step_equals_each_model_alone(rng):
    """K teachers trained at once = each trained alone with key fold_in(key, k)."""

    def noisy(p, x, key):  # a key-dependent model: the per-model keys must match too
        return x @ p["w"] + p["b"] + 0.1 * jax.random.normal(key, (x.shape[0], C))

    tx = optax.adam(0.05)
    params = [{"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
               "b": jnp.zeros(C, jnp.float32)} for _ in range(K)]
    single = make_supervised_step(noisy, tx, pass_key=True)
    stacked = jax.jit(stacked_step(single))
    state = init_stacked_train_state(jax.tree.map(lambda *a: jnp.stack(a), *params), tx)
    alone = [init_train_state(p, tx) for p in params]
    one = jax.jit(single)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    for _ in range(3):
        state, m = stacked(state, {"x": x, "y": y}, KEY)
        outs = [one(s, {"x": x, "y": y}, jax.random.fold_in(KEY, k)) for k, s in enumerate(alone)]
        alone = [s for s, _ in outs]
        np.testing.assert_allclose(m["loss"], [float(mm["loss"]) for _, mm in outs], rtol=1e-6)
    assert int(state.step) == 3 and state.step.shape == ()
    for k, s in enumerate(alone):
        for name in ("w", "b"):
            np.testing.assert_allclose(state.params[name][k], s.params[name], rtol=1e-5,
                                       atol=1e-6)


def test_augment_fn_takes_the_key_first_everywhere(rng):
    """`data.augment(key, x)` plugs into the steps as it is (the library's one convention)."""
    images = rng.normal(size=(B, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)

    def conv_free(p, x):
        return x.reshape(x.shape[0], -1) @ p

    tx = optax.sgd(0.1)
    w = jnp.asarray(rng.normal(size=(8 * 8 * 3, C)) * 0.01, jnp.float32)
    step = jax.jit(make_supervised_step(conv_free, tx, augment_fn=data.augment))
    state, m = step(init_train_state(w, tx), {"x": images, "y": y}, KEY)
    # The augmented batch is data.augment(split(fold_in(key, 0))[0], x).
    aug = data.augment(jax.random.split(jax.random.fold_in(KEY, 0))[0], images)
    want = -_log_softmax(np.asarray(conv_free(w, aug)))[np.arange(B), y].mean()
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    distill = make_distill_step(conv_free, lambda tp, x: jnp.stack([conv_free(tp, x)]), tx,
                                augment_fn=data.augment)
    s2, _ = jax.jit(distill)(init_train_state(w, tx), {"x": images, "y": y}, KEY,
                             teacher_params=w)
    assert int(s2.step) == 1
    with pytest.raises(ValueError, match="`augment_fn` needs online teachers"):
        make_distill_step(conv_free, None, tx, augment_fn=data.augment)


def test_entropy_weighting_in_the_step_reads_the_temperature_one_logits(rng):
    """EBKD weights at T = 1 whatever the distillation temperature (CA-MKD's code)."""
    params, batch, tl = _problem(rng)
    tx = optax.sgd(0.1)
    step = jax.jit(make_distill_step(_linear, None, tx, weighting="entropy", temperature=4.0))
    _, m = step(init_train_state(params, tx), {**batch, "teacher_logits": tl}, KEY)
    p1 = _softmax(tl)
    h = -(p1 * np.log(p1)).sum(-1)
    want = ((1 - h / h.sum(0)) / (K - 1)).mean(1)
    np.testing.assert_allclose(m["teacher_weights"], want, rtol=1e-5)


@pytest.fixture
def registered():
    """A strategy defined outside the package, registered by name for one test."""

    def best_by_margin(probs, *, logits=None, labels=None, label_mask=None, sharpness=10.0):
        top2 = jax.lax.top_k(probs, 2)[0]
        return jax.nn.softmax(sharpness * (top2[..., 0] - top2[..., 1]), axis=0)

    weighting.register_weighting("best_by_margin", best_by_margin)
    yield best_by_margin
    del weighting.WEIGHTINGS["best_by_margin"]


def test_a_strategy_registered_outside_the_package_trains_by_name(rng, registered):
    params, batch, tl = _problem(rng)
    tx = optax.sgd(0.5)
    by_name = jax.jit(make_distill_step(_linear, None, tx, weighting="best_by_margin",
                                        temperature=2.0))
    batch = {**batch, "teacher_logits": tl}
    state = init_train_state(params, tx)
    losses = []
    for _ in range(5):
        state, m = by_name(state, batch, KEY)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    p = _softmax(tl / 2.0)
    top = np.sort(p, -1)
    margin = 10.0 * (top[..., -1] - top[..., -2])
    w = np.exp(margin - margin.max(0)) / np.exp(margin - margin.max(0)).sum(0)
    np.testing.assert_allclose(m["teacher_weights"], w.mean(1), rtol=1e-5)
    # The same with a bound hyperparameter, through get_weighting.
    sharper = make_distill_step(_linear, None, tx,
                                weighting=weighting.get_weighting("best_by_margin", sharpness=50.0))
    _, m50 = jax.jit(sharper)(init_train_state(params, tx), batch, KEY)
    assert not np.allclose(m50["teacher_weights"], m["teacher_weights"])
