"""Metrics from additive statistics against float64 NumPy and sklearn references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mtkd_jax.metrics import (
    NUM_BINS,
    batch_stats,
    compute_metrics,
    init_stats,
    merge_stats,
    update_stats,
)

# Eager mode compiles every primitive separately; one jit per function keeps the tests fast.
batch_stats = jax.jit(batch_stats)
compute_metrics = jax.jit(compute_metrics)


def _softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _reference(logits, labels, ref_probs=None, mask=None):
    """float64 NumPy/sklearn reference over the examples where mask is 1."""
    keep = np.ones(len(labels), bool) if mask is None else np.asarray(mask) > 0
    p = _softmax64(logits)[keep]
    y = np.asarray(labels)[keep]
    pred = p.argmax(-1)
    conf = p.max(-1)
    # Bins ((b-1)/M, b/M], as Guo et al.'s reference code.
    edges = np.linspace(0.0, 1.0, NUM_BINS + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += abs((pred[in_bin] == y[in_bin]).mean() - conf[in_bin].mean()) * in_bin.mean()
    out = {
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
        "recall": skm.recall_score(y, pred, average="macro", zero_division=0),
        "f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "nll": -np.mean(np.log(p[np.arange(len(y)), y])),
        "ece": ece,
    }
    if ref_probs is not None:
        out["agreement"] = np.mean(pred == np.asarray(ref_probs)[keep].argmax(-1))
    return out


def _check(got, want):
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("num_classes", [2, 5, 10])
def test_matches_numpy_and_sklearn(rng, num_classes):
    b = 200
    logits = rng.normal(size=(b, num_classes)).astype(np.float32) * 3
    labels = rng.integers(0, num_classes, size=b).astype(np.int32)
    # Make the predictions right more often than chance so every metric is non-trivial.
    logits[np.arange(b) % 2 == 0, labels[np.arange(b) % 2 == 0]] += 3.0
    ref = rng.dirichlet(np.ones(num_classes), size=b).astype(np.float32)
    stats = batch_stats(jnp.asarray(logits), jnp.asarray(labels), reference_probs=ref)
    got = compute_metrics(stats)
    _check(got, _reference(logits, labels, ref))
    assert int(got["n"]) == b


def test_absent_classes_follow_sklearn(rng):
    """Classes with no support and no predictions leave the macro mean; zero_division=0."""
    c = 6
    labels = rng.integers(0, 3, size=40).astype(np.int32)  # only classes 0..2 occur
    logits = rng.normal(size=(40, c)).astype(np.float32)
    logits[:, 3:5] -= 100.0  # classes 3, 4 never predicted and absent; 5 may be predicted
    logits[:5, 5] += 100.0  # class 5 predicted with no support: precision 0
    got = compute_metrics(batch_stats(jnp.asarray(logits), jnp.asarray(labels)))
    _check(got, _reference(logits, labels))


def test_split_batches_sum_to_one_shot(rng):
    c, b = 5, 90
    logits = rng.normal(size=(b, c)).astype(np.float32) * 2
    labels = rng.integers(0, c, size=b).astype(np.int32)
    ref = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
    one = batch_stats(jnp.asarray(logits), jnp.asarray(labels), reference_probs=ref)
    stats = init_stats(c)
    update = jax.jit(update_stats)
    for lo, hi in [(0, 30), (30, 60), (60, 90)]:  # one shape: one compile
        stats = update(stats, logits[lo:hi], labels[lo:hi], reference_probs=ref[lo:hi])
    for a, b_ in zip(stats, one, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5)
    got, want = compute_metrics(stats), compute_metrics(one)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, atol=1e-6)


def test_psum_over_devices_equals_one_shot(rng, num_devices):
    c, b = 4, 8 * num_devices
    logits = rng.normal(size=(b, c)).astype(np.float32)
    labels = rng.integers(0, c, size=b).astype(np.int32)

    def per_device(z, y):
        return jax.tree.map(lambda s: jax.lax.psum(s, "d"), batch_stats(z, y))

    z = logits.reshape(num_devices, -1, c)
    y = labels.reshape(num_devices, -1)
    summed = jax.tree.map(lambda s: s[0], jax.pmap(per_device, axis_name="d")(z, y))
    _check(compute_metrics(summed), _reference(logits, labels))


def test_mask_ignores_padding(rng):
    c, b = 5, 40
    logits = rng.normal(size=(b, c)).astype(np.float32)
    labels = rng.integers(0, c, size=b).astype(np.int32)
    mask = (rng.random(b) < 0.7).astype(np.float32)
    padded = np.where(mask > 0, labels, -1).astype(np.int32)  # placeholder labels
    ref = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
    stats = batch_stats(jnp.asarray(logits), jnp.asarray(padded), reference_probs=ref, mask=mask)
    assert int(stats.n) == int(mask.sum()) == int(stats.agree_n)
    _check(compute_metrics(stats), _reference(logits, labels, ref, mask))


def test_ece_bins_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.7 (right) land in 0-based bins 13, 13, 10.
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7]], np.float32)
    stats = batch_stats(jnp.log(p), jnp.array([0, 1, 1]))
    want_count = np.zeros(NUM_BINS, int)
    want_count[[13, 10]] = [2, 1]
    np.testing.assert_array_equal(np.asarray(stats.bin_count), want_count)
    assert stats.bin_correct[13] == 1 and stats.bin_correct[10] == 1
    want = (abs(1 - 1.8) + abs(1 - 0.7)) / 3
    np.testing.assert_allclose(float(compute_metrics(stats)["ece"]), want, rtol=1e-5)


def test_empty_and_no_reference():
    m = compute_metrics(init_stats(3))
    assert float(m["accuracy"]) == 0.0 and float(m["f1"]) == 0.0 and int(m["n"]) == 0
    assert np.isnan(float(m["agreement"]))


def test_merge_is_commutative(rng):
    s1 = batch_stats(jnp.asarray(rng.normal(size=(40, 5)), jnp.float32), jnp.arange(40) % 5)
    s2 = batch_stats(jnp.asarray(rng.normal(size=(40, 5)), jnp.float32), jnp.arange(40) % 3)
    for a, b in zip(merge_stats(s1, s2), merge_stats(s2, s1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        init_stats(0)
    with pytest.raises(ValueError, match=r"`logits` must have shape \[B, C\]"):
        batch_stats(jnp.zeros((2, 3, 4)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="`labels` must have shape"):
        batch_stats(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="integer class indices"):
        batch_stats(jnp.zeros((2, 3)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="reference_probs"):
        batch_stats(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), reference_probs=jnp.ones(3))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        batch_stats(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), mask=jnp.ones(3))
    with pytest.raises(ValueError, match="stats` are for 4 classes"):
        update_stats(init_stats(4), jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))
