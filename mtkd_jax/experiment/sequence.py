"""The sequence experiment: token-level multi-teacher distillation of a small causal model.

Per seed: a token corpus from the procedural source (`mtkd_jax.data.text`), K causal token
teachers of different sizes (`mtkd_jax.models.zoo.token`) trained with `make_supervised_step`
(token cross-entropy over valid tokens), their top-k outputs cached once per token
(`mtkd_jax.cache.build_cache` with the vocabulary fingerprint, read back with
`with_cached_logits`), then students distilled with `make_distill_step` and the chunked
loss (`student_head`): alone (labels only), from the best single teacher (lowest validation
perplexity), and from all K teachers with each configured weighting (per token). Test
perplexity, token accuracy and agreement with the teacher ensemble over valid tokens
(`mtkd_jax.training.evaluation`), mean ± std over seeds (`mtkd_jax.experiment.report`), a bar plot
(`mtkd_jax.experiment.plots`) and TensorBoard scalars (`mtkd_jax.experiment.summaries`).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtkd_jax.cache import build_cache, open_cache, with_cached_logits
from mtkd_jax.data import text
from mtkd_jax.experiment import plots, report, summaries
from mtkd_jax.models.zoo.token import CausalTokenModel, token_model_fns
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step, make_supervised_step

__all__ = ["run_sequence"]

METRICS = ("perplexity", "accuracy", "agreement")


def _train(step, state, split, cfg, *, seed, epochs, writer_log, extra=None):
    key = jax.random.key(seed)
    n = 0
    for epoch in range(epochs):
        losses = []
        stream = text.batches(split, batch_size=cfg.batch_size, seed=seed, epoch=epoch)
        if extra is not None:
            stream = extra(stream)
        for batch in stream:
            batch = {k: v for k, v in batch.items() if k != "index"}
            state, m = step(state, batch, key)
            losses.append(m["loss"])
            n += 1
        writer_log(n, {"train/loss": float(np.mean(jax.device_get(losses)))})
    return state


def _models(cfg, seed):
    vocab = cfg.data.vocab_size
    t = cfg.teachers
    teachers = [CausalTokenModel(vocab, dim=dim, depth=depth, context=context,
                                 rngs=nnx.Rngs(1000 * seed + k))
                for k, (dim, depth, context) in enumerate(zip(t.dims, t.depths, t.contexts,
                                                              strict=True))]
    s = cfg.student
    student = CausalTokenModel(vocab, dim=s.dim, depth=s.depth, context=s.context,
                               rngs=nnx.Rngs(1000 * seed + 999))
    return teachers, student


def _eval_rows(step, params, split, cfg, teacher_logits_fn):
    batches = [
        {**{k: v for k, v in b.items() if k != "index"}, "teacher_logits": teacher_logits_fn(b)}
        for b in text.batches(split, batch_size=cfg.batch_size, shuffle=False,
                              drop_remainder=False)
    ]
    return evaluate(step, params, batches)


def _fns(module, built: dict, name: str):
    """A module's functions, built once per architecture (so every seed reuses the compiled
    steps), and this module's params."""
    fns, params = token_model_fns(module)
    if name not in built:
        built[name] = fns
    return built[name], params


def _step(built: dict, name: str, make):
    if name not in built:
        built[name] = jax.jit(make())
    return built[name]


def _one_seed(cfg, seed: int, out_dir: str, built: dict) -> dict[str, dict[str, float]]:
    source = text.make_source(vocab_size=cfg.data.vocab_size, branching=cfg.data.branching,
                              seed=cfg.data.source_seed)
    d = cfg.data
    splits = {name: text.sample_split(source, num, max_len=d.max_len, min_len=d.min_len,
                                      seed=100 * seed + i)
              for i, (name, num) in enumerate((("train", d.num_train), ("val", d.num_val),
                                               ("test", d.num_test)))}
    teachers, student = _models(cfg, seed)
    tx = optax.adam(cfg.learning_rate)
    writer = summaries.make_writer(os.path.join(out_dir, "tensorboard", f"seed{seed}"))

    def log_for(row):
        log = summaries.log_fn(writer)
        return lambda step, m: log(step, {f"{row}/{k}": v for k, v in m.items()})

    # Teachers: supervised on the train split (token CE over valid tokens).
    t_fns, t_params = [], []
    for k, module in enumerate(teachers):
        fns, params = _fns(module, built, f"fns/teacher_{k}")
        step = _step(built, f"step/teacher_{k}", lambda fns=fns: make_supervised_step(
            fns.logits, tx))
        state = _train(step, init_train_state(params, tx),
                       splits["train"], cfg, seed=seed, epochs=cfg.teacher_epochs,
                       writer_log=log_for(f"teacher_{k}"))
        t_fns.append(fns)
        t_params.append(state.params)

    def make_teacher_apply(t_fns=tuple(t_fns)):
        return lambda tp, x: jnp.stack([f.logits(p, x) for f, p in zip(t_fns, tp,
                                                                       strict=True)])

    if "teacher_apply" not in built:
        built["teacher_apply"] = make_teacher_apply()
    teacher_apply = built["teacher_apply"]
    run_teachers = _step(built, "run_teachers", lambda: teacher_apply)
    eval_teachers = built.setdefault("eval_teachers", make_eval_step(None, None))
    rows = {}
    test_logits = lambda b: np.asarray(run_teachers(t_params, b["x"]))  # noqa: E731
    teacher_eval = evaluate(eval_teachers, None, [
        {**{k: v for k, v in b.items() if k != "index"}, "teacher_logits": test_logits(b)}
        for b in text.batches(splits["test"], batch_size=cfg.batch_size, shuffle=False,
                              drop_remainder=False)])
    for k in range(len(teachers)):
        rows[f"teacher_{k}"] = teacher_eval[f"teacher_{k}"]
    rows["ensemble"] = teacher_eval["ensemble"]
    val = evaluate(eval_teachers, None, [
        {**{k: v for k, v in b.items() if k != "index"},
         "teacher_logits": np.asarray(run_teachers(t_params, b["x"]))}
        for b in text.batches(splits["val"], batch_size=cfg.batch_size, shuffle=False)])
    best = int(np.argmin([val[f"teacher_{k}"]["perplexity"] for k in range(len(teachers))]))

    # The teachers' top-k outputs per token, cached once with the vocabulary fingerprint.
    fingerprint = text.vocab_fingerprint(source.vocab)
    cache_dir = os.path.join(out_dir, "cache", f"seed{seed}")
    build_cache(cache_dir, teacher_apply, t_params,
                text.batches(splits["train"], batch_size=cfg.batch_size, shuffle=False,
                             drop_remainder=False),
                num_examples=d.num_train, top_k=cfg.cache_top_k, tokenizer=fingerprint,
                overwrite=True, progress=False)
    cache = open_cache(cache_dir, expect_tokenizer=fingerprint)

    s_fns, s_params = _fns(student, built, "fns/student")
    eval_student = built.setdefault("eval_student", make_eval_step(s_fns.logits, None))
    init = init_train_state(s_params, tx)
    runs = {"alone": None, "best teacher": [best]}
    runs.update({w: "all" for w in cfg.weightings})
    for row, which in runs.items():
        if which is None:
            step = _step(built, "step/alone", lambda: make_supervised_step(s_fns.logits, tx))
            extra = None
        else:
            step = _step(built, f"step/{row}", lambda row=row: make_distill_step(
                s_fns.features, None, tx, student_head=s_fns.head,
                chunk_size=cfg.chunk_size, temperature=cfg.temperature, alpha=cfg.alpha,
                weighting="uniform" if row == "best teacher" else row,
            ))

            def extra(stream, which=which):
                for b in with_cached_logits(stream, cache):
                    if which != "all":
                        b["teacher_logits"] = b["teacher_logits"][which]
                    yield b
        state = _train(step, init, splits["train"], cfg, seed=seed,
                       epochs=cfg.student_epochs, writer_log=log_for(row), extra=extra)
        name = f"{len(teachers)} teachers: {row}" if which == "all" else row
        rows[name] = _eval_rows(eval_student, state.params, splits["test"], cfg,
                                test_logits)["student"]
    for row, m in rows.items():
        for metric in METRICS:
            writer.add_scalar(f"test/{row}/{metric}", m[metric], global_step=0)
    writer.close()
    rows["_best_teacher"] = {"index": float(best)}
    return rows


def _plot_perplexity(table, path: str) -> str:
    """Horizontal bars of test perplexity, mean ± std over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.35 * len(table) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(table))[::-1]
    ax.barh(y, [r["perplexity_mean"] for r in table],
            xerr=[r["perplexity_std"] for r in table],
            color=["tab:gray" if r["group"] == "teachers" else "tab:blue" for r in table])
    ax.set_yticks(y)
    ax.set_yticklabels([r["row"] for r in table], fontsize=8)
    ax.set_xlabel("test perplexity per valid token (mean ± std over seeds; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _verdict_lines(seed_rows, multi_rows) -> list[str]:
    lines = []
    for base in ("alone", "best teacher"):
        for row in multi_rows:
            diff = [r[row]["perplexity"] - r[base]["perplexity"] for r in seed_rows]
            wins = sum(d < 0 for d in diff)
            mean, std = float(np.mean(diff)), float(np.std(diff, ddof=1)) if len(diff) > 1 else 0
            verdict = ("helps" if mean < 0 and wins == len(diff) else
                       "hurts" if mean > 0 and wins == 0 else "no clear difference")
            lines.append(f"- {row} vs {base}: perplexity {mean:+.3f} ± {std:.3f} "
                         f"(lower on {wins}/{len(diff)} seeds): {verdict}.")
    return lines


def run_sequence(cfg) -> dict:
    """Run the experiment of `cfg` (`experiments/configs/sequence.py`); write results.md,
    results.json, perplexity.png, accuracy.png and TensorBoard events to `cfg.output_dir`.

    Returns:
      `{"table": aggregate rows, "seeds": per-seed rows, "markdown": results.md text}`.
    """
    start = time.perf_counter()
    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    built: dict = {}  # functions and jitted steps, shared by the seeds
    seed_rows = [_one_seed(cfg, seed, out, built) for seed in range(cfg.seeds)]
    best = [int(r.pop("_best_teacher")["index"]) for r in seed_rows]
    table = report.aggregate(seed_rows)
    num_teachers = len(cfg.teachers.dims)
    multi = [r for r in seed_rows[0] if r.startswith(f"{num_teachers} teachers")]
    for rec in table:
        rec["group"] = "teachers" if rec["row"].startswith(("teacher", "ensemble")) else \
            "students"
    png = [plots.plot_accuracy(table, os.path.join(out, "accuracy.png")),
           _plot_perplexity(table, os.path.join(out, "perplexity.png"))]
    seconds = time.perf_counter() - start
    entropy = text.make_source(vocab_size=cfg.data.vocab_size, branching=cfg.data.branching,
                               seed=cfg.data.source_seed).entropy_rate()
    md = "\n".join([
        "# Sequence distillation (token level)", "",
        f"{cfg.seeds} seeds, {num_teachers} teachers "
        f"(dims {list(cfg.teachers.dims)}), student dim {cfg.student.dim}; "
        f"vocabulary {cfg.data.vocab_size}, sequences of {cfg.data.min_len}-"
        f"{cfg.data.max_len} tokens; {cfg.data.num_train} train sequences. Test metrics "
        f"over valid tokens (padding excluded), mean ± std over seeds. Best single teacher "
        f"(by validation perplexity) per seed: {best}. Source entropy (uniform over "
        f"contexts): {entropy:.3f} nats, perplexity {np.exp(entropy):.2f}. "
        f"Wall time {seconds:.0f} s.", "",
        report.markdown_table(table, ("perplexity", "accuracy", "nll", "agreement")), "",
        "Paired over seeds (multi-teacher minus baseline):", "",
        *_verdict_lines(seed_rows, multi), "",
        "Plots: " + ", ".join(os.path.basename(p) for p in png) + " (accuracy.png is "
        "per-token accuracy).", "",
    ])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"table": table, "seeds": seed_rows, "best_teacher": best,
                   "seconds": seconds}, f, indent=1)
    return {"table": table, "seeds": seed_rows, "markdown": md, "seconds": seconds}
