"""The aligned (cross-tokenizer) distillation step against the same-tokenizer step.

Same sizes, same process: K transformer teachers and one student, rows of L tokens, the
chunked loss. The same-tokenizer step runs the teachers on the student's tokens; the aligned
step runs each teacher on its own rows `[B, L_t]` (`L_t` = `--teacher-len`), takes its
output at the aligned positions and projects it onto the student's vocabulary
(`mtkd_jax.objective.cross_tokenizer`, ``--method``), with a random alignment and a random
projection of the same vocabulary size (the cost does not depend on which tokens match; the
fan-ins are drawn as real tokenizer pairs have them, most 1, a few up to tens).

Two pairs, every step called in turn (a shared machine's load touches all alike), median wall
and CPU time of each:

* **chunked** (the library's fast path, ``prefix`` only): teachers give features and their
  heads run per chunk of the loss, on both sides (`make_distill_step(teacher_head=)`; the
  aligned side by `aligned_teacher_heads` on `aligned_inputs` batches);
* **precomputed**: the teachers' whole logits `[K, B, L, V]` (stacked; the aligned side by
  `make_aligned_teachers`, which ``uld`` needs) handed to the step.

    PYTHONPATH=. python benchmarks/cross_tokenizer.py --vocab 4096 --steps 10
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtkd_jax.core.vocab_projection import VocabProjection
from mtkd_jax.models.transformer import Transformer, TransformerConfig
from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.objective.cross_tokenizer import (
    aligned_inputs,
    aligned_teacher_heads,
    make_aligned_teachers,
    student_input,
    student_unmatched,
)
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step


def _model(vocab, dim, length, seed):
    cfg = TransformerConfig(vocab_size=vocab, dim=dim, depth=2, heads=4, kv_heads=2,
                            mlp_dim=2 * dim, max_len=length)
    return token_model_fns(Transformer(cfg, rngs=nnx.Rngs(seed)))


def _time(fns, steps):
    """Median wall and CPU seconds of each function, called in turn (compiled first), so a
    load that comes and goes on a shared machine touches every one alike."""
    for fn in fns:
        jax.block_until_ready(fn())  # compile
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [float(np.median(w)) for w in wall], [float(np.median(c)) for c in cpu]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--teacher-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--method", default="prefix", choices=["prefix", "uld"])
    ap.add_argument("--uld-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    k, b, length, lt, v = args.teachers, args.batch, args.seq_len, args.teacher_len, args.vocab
    teachers = [_model(v, args.dim, max(length, lt), 1 + i) for i in range(k)]
    fns, sp = _model(v, args.dim, length, 0)
    tp = tuple(p for _, p in teachers)
    tx = optax.adam(1e-3)
    state = init_train_state(sp, tx)
    step = make_distill_step(fns.features, None, tx, student_head=fns.head,
                             chunk_size=args.chunk, weighting="confidence", alpha=0.5)
    tokens = rng.integers(2, v, (b, length)).astype(np.int32)
    y = np.roll(tokens, -1, 1)
    mask = np.ones((b, length), np.float32)
    t_logits = teachers[0][0].logits

    @jax.jit  # the teachers' params an argument, as in `mtkd lm` (not compiled-in constants)
    def same(state, batch, tp):
        z = jnp.stack([t_logits(p, batch["x"]) for p in tp])
        return step(state, {**batch, "teacher_logits": z}, jax.random.key(0))

    projs = []
    for _ in range(k):
        # Most tokens match one to one; the rest map onto a prefix, fan-ins up to tens.
        exact = np.where(rng.random(v) < 0.7, rng.permutation(v), -1)
        prefix = np.where(exact >= 0, exact, rng.integers(0, v, v) ** 2 // v)
        projs.append(VocabProjection.from_maps(exact, prefix, student_vocab_size=v))
    aligned_teachers = make_aligned_teachers([t_logits] * k, projs, method=args.method,
                                             uld_size=args.uld_size)
    step_x = make_distill_step(fns.features, None, tx, student_head=fns.head,
                               chunk_size=args.chunk, weighting="confidence", alpha=0.5,
                               student_unmatched=student_unmatched(projs))

    @jax.jit
    def aligned(state, batch, tp):
        return step_x(state, {**batch, **aligned_teachers(tp, batch)}, jax.random.key(0))

    t_feat, t_head = teachers[0][0].features, teachers[0][0].head
    same_c_step = make_distill_step(
        fns.features, lambda tps, x: jnp.stack([t_feat(p, x) for p in tps]), tx,
        student_head=fns.head, chunk_size=args.chunk, weighting="confidence", alpha=0.5,
        teacher_head=lambda tps, f: jnp.stack([t_head(p, f[i]) for i, p in enumerate(tps)]))
    same_c = jax.jit(lambda st, b, tps: same_c_step(st, b, jax.random.key(0),
                                                    teacher_params=tps))
    chunked = None
    if args.method == "prefix":
        c_apply, c_head = aligned_teacher_heads([t_feat] * k, [t_head] * k, projs)
        chunked_step = make_distill_step(
            student_input(fns.features), c_apply, tx, student_head=fns.head,
            teacher_head=c_head, chunk_size=args.chunk, weighting="confidence", alpha=0.5)
        chunked = jax.jit(lambda st, b, tps: chunked_step(st, aligned_inputs(b),
                                                          jax.random.key(0),
                                                          teacher_params=tps))
    base = {"x": tokens, "y": y, "mask": mask}
    seg = np.ones((k, b, lt), np.int32)
    xt = {"teacher_tokens": rng.integers(2, v, (k, b, lt)).astype(np.int32),
          "teacher_segment_ids": seg,
          "teacher_positions": np.broadcast_to(np.arange(lt, dtype=np.int32), (k, b, lt)),
          "teacher_index": np.sort(rng.integers(0, lt, (k, b, length)), -1).astype(np.int32),
          "teacher_available": (rng.random((k, b, length)) < 0.8).astype(np.float32)}
    fns_timed = {"same, precomputed": lambda: same(state, base, tp)[1]["loss"],
                 "aligned, precomputed": lambda: aligned(state, {**base, **xt}, tp)[1]["loss"],
                 "same, chunked": lambda: same_c(state, base, tp)[1]["loss"]}
    if chunked is not None:
        fns_timed["aligned, chunked"] = lambda: chunked(state, {**base, **xt}, tp)[1]["loss"]
    losses = {name: float(fn()) for name, fn in fns_timed.items()}
    wall, cpu = _time(list(fns_timed.values()), args.steps)
    t = dict(zip(fns_timed, wall, strict=True))
    c = dict(zip(fns_timed, cpu, strict=True))
    print(f"K={k} B={b} L={length} L_t={lt} V={v} dim={args.dim} chunk={args.chunk} "
          f"method={args.method} uld_size={args.uld_size} on {jax.devices()[0].platform}")
    for name in fns_timed:
        print(f"  {name:22s} {t[name] * 1e3:7.1f} ms (CPU {c[name] * 1e3:7.1f} ms), first loss "
              f"{losses[name]:.7f}")
    for kind in ("precomputed", "chunked"):
        a, sm = f"aligned, {kind}", f"same, {kind}"
        if a in t:
            print(f"{kind}: aligned / same-tokenizer step {t[a] / t[sm]:.2f} "
                  f"(CPU time {c[a] / c[sm]:.2f})")
    if chunked is not None:
        gap = abs(losses["aligned, chunked"] / losses["aligned, precomputed"] - 1)
        print(f"the chunked and the precomputed aligned steps' first losses differ by {gap:.1e} "
              "(relative)")
    return t

if __name__ == "__main__":
    main()
