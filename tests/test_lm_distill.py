"""Token-level distillation from transformer teachers: per-token teacher weights and the loss
do not depend on how a batch is split into micro-batches or over devices.

(A known bug elsewhere: NeMo-RL #4173 picks a different teacher when only the micro-batch
size changes, because its weights are normalised per micro-batch.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtkd_jax.models.transformer import Transformer, TransformerConfig
from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.objective.loss import distill_sums, finish_distill
from mtkd_jax.parallel import data_mesh, data_parallel_step
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step
from mtkd_jax.weighting import get_weighting

V, L, B, K = 37, 12, 8, 3


def _packed_batch(rng):
    """Rows of 1-3 packed documents with trailing padding: tokens, segment ids, mask."""
    tokens = rng.integers(2, V, size=(B, L)).astype(np.int32)
    seg = np.sort(rng.integers(1, 4, size=(B, L)), axis=1).astype(np.int32)
    mask = np.ones((B, L), np.float32)
    for b in range(B):
        pad = rng.integers(0, 4)
        if pad:
            seg[b, -pad:], mask[b, -pad:], tokens[b, -pad:] = 0, 0.0, 0
            seg[b, :-pad] = np.maximum(seg[b, :-pad], 1)
    labels = np.where(mask > 0, np.roll(tokens, -1, axis=1), 0).astype(np.int32)
    return {"x": {"tokens": tokens, "segment_ids": seg}, "y": labels, "mask": mask}


def _models():
    cfg = TransformerConfig(vocab_size=V, dim=16, depth=1, heads=2, kv_heads=1, mlp_dim=32,
                            max_len=L)
    student_fns, sp = token_model_fns(Transformer(cfg, rngs=nnx.Rngs(0)))
    teachers = [token_model_fns(Transformer(cfg.replace(dim=24), rngs=nnx.Rngs(1 + k)))
                for k in range(K)]
    t_fns = teachers[0][0]
    tp = tuple(p for _, p in teachers)
    teacher_apply = lambda tp, x: jnp.stack([t_fns.logits(p, x) for p in tp])  # noqa: E731
    return student_fns, sp, teacher_apply, tp


def _rows(batch, idx):
    return jax.tree.map(lambda a: a[idx], batch)


def test_weights_and_loss_do_not_depend_on_micro_batches(rng):
    batch = _packed_batch(rng)
    fns, sp, teacher_apply, tp = _models()
    weighting = get_weighting("posterior", sharpness=2.0)

    @jax.jit
    def sums(b):
        zt = teacher_apply(tp, b["x"])
        return distill_sums(fns.logits(sp, b["x"]), zt, b["y"], mask=b["mask"],
                            temperature=2.0, weighting=weighting)

    whole = sums(batch)
    for size in (1, 2, 4):
        parts = [sums(_rows(batch, np.arange(i, i + size))) for i in range(0, B, size)]
        added = jax.tree.map(lambda *xs: sum(xs), *parts)
        added = added._replace(finite=whole.finite)  # a min across parts, not a sum
        for name in ("weights", "divergence", "agree", "correct"):
            np.testing.assert_allclose(getattr(added, name), getattr(whole, name),
                                       rtol=1e-5, err_msg=f"{name}, micro-batch {size}")
        np.testing.assert_allclose(added.loss.soft, whole.loss.soft, rtol=1e-5)
        loss_parts, metrics = finish_distill(added, alpha=0.5)
        ref_parts, ref_metrics = finish_distill(whole, alpha=0.5)
        np.testing.assert_allclose(loss_parts.loss, ref_parts.loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["teacher_weights"], ref_metrics["teacher_weights"],
                                   rtol=1e-5)


def test_step_on_one_device_equals_eight(rng):
    batch = _packed_batch(rng)
    fns, sp, teacher_apply, tp = _models()
    tx = optax.adam(1e-2)
    step = make_distill_step(fns.features, teacher_apply, tx, student_head=fns.head,
                             chunk_size=5, weighting="posterior", alpha=0.5, temperature=2.0)
    state = init_train_state(sp, tx)
    one = data_parallel_step(step, data_mesh(jax.devices()[:1]))
    eight = data_parallel_step(step, data_mesh())
    s1, m1 = one(state, batch, jax.random.key(0), teacher_params=tp)
    s8, m8 = eight(state, batch, jax.random.key(0), teacher_params=tp)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["teacher_weights"], m8["teacher_weights"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
