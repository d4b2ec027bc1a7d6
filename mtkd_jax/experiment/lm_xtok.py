"""`mtkd lm` with teachers that have their own tokenizers (``--config.tokenizers=own``).

The setting of `mtkd_jax.experiment.lm` (one teacher per text domain, one student on the
mixture), but every teacher has **its own tokenizer**: a byte-level BPE trained on its own
domain, of its own size (`own_tokenizers.teacher_vocab_sizes`), and the student another
one (`data.vocab_size`, trained on the mixture). The teachers are trained once and shared by
the seeds: the own-tokenizer teachers on rows of `teacher_len` of their own tokens, and, as
the reference, the same teachers' architecture trained with the *student's* tokenizer
(rows of `seq_len`). Per seed, a student on a fixed sample of the mixture's training text
(the transfer rows, the same for every row):

* ``alone``: next-token cross-entropy only;
* ``shared tokenizer``: distilled from the shared-tokenizer teachers (online, the
  shared-vocabulary step of `mtkd lm`), with `own_tokenizers.weighting`;
* ``own tokenizers: <method>``: distilled from the own-tokenizer teachers, each teacher's
  rows of the same text aligned to the student's by byte offsets
  (`mtkd_jax.data.alignment.pack_aligned`) and its next-token distribution carried onto the
  student's vocabulary by `<method>` (``prefix``, ``uld``:
  `mtkd_jax.core.vocab_projection`), the same weighting over the teachers that can speak at
  each token (`mtkd_jax.objective.cross_tokenizer.make_aligned_teachers`).

Every student is scored by **bits per byte** on each domain's test rows and the mixture
(comparable across tokenizers). The report (results.md, results.json in the run folder)
gives, per row, the mixture bpb (mean ± std over seeds), the fraction of the shared row's
gain over ``alone`` it keeps (per seed, then mean ± std; the issue's goal: >= 80% with the
best method), each teacher's availability (the fraction of the student's transfer tokens
it is aligned at) and the step time relative to the shared step, measured in the same
process on the same batch. The run folder, checkpoints, resume of finished rows, progress
bar, stage times and Ctrl-C are `mtkd lm`'s (`mtkd_jax.experiment.lm_run`).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from mtkd_jax.data import prepare_lm_data
from mtkd_jax.data.alignment import build_projection, encode_with_ends, pack_aligned
from mtkd_jax.data.corpora import TextDomain, load_domain
from mtkd_jax.data.pipeline import epoch_order
from mtkd_jax.experiment import report
from mtkd_jax.experiment.lm_run import (
    LMModels,
    LMRun,
    eval_batches,
    eval_student,
    first_rows,
    flatten,
    nll_eval,
    online_teachers,
    optimizer,
    select_rows,
    student_test_step,
    train_model,
    train_teacher,
    with_bpb,
)
from mtkd_jax.experiment.progress import RunProgress, log
from mtkd_jax.objective.cross_tokenizer import (
    aligned_inputs,
    aligned_teacher_heads,
    make_aligned_teachers,
    student_input,
    student_unmatched,
)
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step, make_supervised_step
from mtkd_jax.weighting import get_weighting

__all__ = ["run_lm_xtok", "teacher_len"]

_SHARED = "shared tokenizer"
_OWN = "own tokenizers"
_TEACHER_FIELDS = ("teacher_tokens", "teacher_segment_ids", "teacher_positions",
                   "teacher_index", "teacher_available")


def teacher_len(cfg) -> int:
    """The own-tokenizer teachers' row length: `own_tokenizers.teacher_len`, 0 meaning
    2 x `data.seq_len` (a teacher with a smaller vocabulary needs more tokens for the same
    text)."""
    return cfg.own_tokenizers.teacher_len or 2 * cfg.data.seq_len


def _weighting(cfg):
    name = cfg.own_tokenizers.weighting
    return get_weighting(name, **({"sharpness": cfg.posterior_sharpness}
                                  if name == "posterior" else {}))


# ---------------------------------------------------------------------------- data
def _texts(cfg) -> list[str]:
    """The mixture's training documents as `prepare_lm_data` saw them, in a fixed shuffled
    order (seed 0)."""
    domains = [d if isinstance(d, TextDomain) else load_domain(d) for d in cfg.data.domains]
    if cfg.data.max_documents:
        domains = [d.take(cfg.data.max_documents) for d in domains]
    texts = [t for d in domains for t in d["train"] if t]
    return [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]


def _transfer(cfg, student_tok, teacher_toks) -> dict[str, np.ndarray]:
    """`student.transfer_rows` rows of the shuffled mixture text: the student's packed rows
    and each own-tokenizer teacher's aligned rows (`pack_aligned`), `[N, L]` / `[K, N, ...]`.
    Only as many documents as fill the rows are aligned."""
    texts, need = _texts(cfg), cfg.student.transfer_rows * cfg.data.seq_len
    lengths = np.cumsum([len(ids) + 1 for ids, _ in encode_with_ends(student_tok, texts)])
    n_docs = int(min(len(texts), np.searchsorted(lengths, need) + 2))
    rows = pack_aligned(texts[:n_docs], student_tok, teacher_toks, seq_len=cfg.data.seq_len,
                        teacher_len=teacher_len(cfg))
    n = rows["x"].shape[0]
    if n < cfg.student.transfer_rows:
        raise ValueError(f"`student.transfer_rows` = {cfg.student.transfer_rows} is more than "
                         f"the {n} rows the mixture's training text fills.")
    keep = cfg.student.transfer_rows
    return {k: (v[:, :keep] if k.startswith("teacher_") else v[:keep]) for k, v in rows.items()}


def _batches(rows: dict, *, batch_size: int, seed: int, epoch: int, start: int,
             teachers: bool):
    """Batches of the transfer rows in `epoch_order(seed, epoch)` from batch `start` on:
    the model's fields (`lm_run.model_batch`'s layout) and, with `teachers`, the aligned
    teacher rows `[K, B, ...]`."""
    n = rows["x"].shape[0]
    order = epoch_order(n, seed=seed, epoch=epoch)
    for begin in range(start * batch_size, n - n % batch_size, batch_size):
        idx = np.sort(order[begin:begin + batch_size])
        b = {"x": {"tokens": rows["x"][idx], "segment_ids": rows["segment_ids"][idx],
                   "positions": rows["positions"][idx]},
             "y": rows["y"][idx], "mask": rows["mask"][idx]}
        if teachers:
            b.update({k: rows[k][:, idx] for k in _TEACHER_FIELDS})
        yield b


# ---------------------------------------------------------------------------- the run
def _teachers(run, mix, own_data):
    """Train (or restore) the own-tokenizer and the shared-tokenizer teachers; returns
    `({"own": (fns list, params tuple), "shared": (fns, params tuple)}, curves, rows)`,
    `rows` each teacher's test metrics on its own domain (its own tokenizer's rows)."""
    cfg = run.cfg
    out, curves, rows = {"own": ([], []), "shared": ([], [])}, {}, {}
    lt = teacher_len(cfg)
    shared_models = LMModels(cfg, mix.tokenizer.vocab_size)
    for k, dm in enumerate(mix.domains):
        data = own_data[k]
        models = LMModels(cfg, data.tokenizer.vocab_size, max_len=lt)
        for which, d, m, name, seed in (
                ("own", data, models, f"teacher {dm} (own tokenizer)", 20_000 + k),
                ("shared", mix, shared_models, f"teacher {dm} ({_SHARED})", k)):
            fns, params, curves[name] = train_teacher(
                run, m, name, d.packed[dm]["train"],
                first_rows(d.packed[dm]["validation"], cfg.val_rows), seed=seed)
            out[which][0].append(fns)
            out[which][1].append(params)
            test = first_rows(d.packed[dm]["test"], cfg.test_rows)
            stats = evaluate(m.cached("teacher eval", None), params,  # train_teacher's
                             eval_batches(test, cfg.eval_batch_size))["student"]
            rows[name] = {**with_bpb(stats, test), "vocab_size": d.tokenizer.vocab_size}
    return {w: (f, tuple(p)) for w, (f, p) in out.items()}, curves, rows


def _steps(cfg, models, teachers, projections):
    """The jitted training step of every student row, `{row: step(state, batch, key)}`, and
    whether the row reads the aligned teacher rows."""
    fns = models.init("student", 0)[0]
    tx = optimizer(cfg.student, cfg.student.steps)
    own_fns, own_params = teachers["own"]
    shared_fns, shared_params = teachers["shared"]
    common = dict(student_head=fns.head, chunk_size=cfg.chunk_size,
                  temperature=cfg.temperature, alpha=cfg.alpha, weighting=_weighting(cfg))
    out = {"alone": (jax.jit(make_supervised_step(fns.logits, tx)), False)}
    # Online teachers through the chunked loss on both sides: features for the batch, the
    # output heads (and, for teachers with their own tokenizers, the projection) per chunk.
    t_apply, t_head = online_teachers(shared_fns[0])
    shared = jax.jit(make_distill_step(fns.features, t_apply, tx, teacher_head=t_head,
                                       **common))
    out[_SHARED] = (lambda st, b, key: shared(st, b, key, teacher_params=shared_params),
                    False)
    o = cfg.own_tokenizers
    for method in o.methods:
        if method == "prefix":
            a_apply, a_head = aligned_teacher_heads([f.features for f in own_fns],
                                                    [f.head for f in own_fns], projections)
            chunked = jax.jit(make_distill_step(student_input(fns.features), a_apply, tx,
                                                teacher_head=a_head, **common))
            out[f"{_OWN}: {method}"] = (
                lambda st, b, key, step=chunked: step(st, aligned_inputs(b), key,
                                                      teacher_params=own_params), True)
            continue
        aligned = make_aligned_teachers([f.logits for f in own_fns], projections,
                                        method=method, uld_size=o.uld_size)
        distill = make_distill_step(fns.features, None, tx,
                                    student_unmatched=student_unmatched(projections),
                                    uld_weight=o.uld_weight, **common)

        # The teachers' params are an argument of the compiled step, not constants baked
        # into it (as the shared step's `teacher_params`).
        @jax.jit
        def step(state, batch, key, teacher_params, aligned=aligned, distill=distill):
            return distill(state, {**batch, **aligned(teacher_params, batch)}, key)

        out[f"{_OWN}: {method}"] = (
            lambda st, b, key, step=step: step(st, b, key, own_params), True)
    return out, tx


def _step_seconds(steps: dict, state, rows: dict, *, batch_size: int,
                  repeats: int = 5) -> dict[str, float]:
    """Median seconds of each row's step on the same batch (after one compiling call), in
    this process, one row after the other."""
    out = {}
    for row, (step, teachers) in steps.items():
        b = next(_batches(rows, batch_size=batch_size, seed=0, epoch=0, start=0,
                          teachers=teachers))
        key = jax.random.key(0)
        jax.block_until_ready(step(state, b, key)[1]["loss"])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(state, b, key)[1]["loss"])
            times.append(time.perf_counter() - t0)
        out[row] = float(np.median(times))
    return out


def run_lm_xtok(cfg) -> dict:
    """Run `cfg` (`mtkd lm` with ``tokenizers="own"``, e.g. experiments/configs/lm_xtok.py;
    validated by `mtkd_jax.experiment.lm.run_lm`); results.md and results.json in
    `cfg.output_dir`.

    Returns:
      `{"table", "seeds", "teachers", "availability", "step_seconds", "gain_kept",
      "markdown", "seconds"}`.
    """
    start = time.perf_counter()
    run = LMRun(cfg)
    d, o = cfg.data, cfg.own_tokenizers
    k = len(d.domains)
    methods = tuple(o.methods)
    plan = ["alone", _SHARED, *[f"{_OWN}: {m}" for m in methods]]
    with run.times.listening():
        with run.times.stage("data"):
            common = dict(seed=0, max_documents=d.max_documents or None)
            mix = prepare_lm_data(tuple(d.domains), seq_len=d.seq_len,
                                  vocab_size=d.vocab_size, **common)
            own_data = [prepare_lm_data((dm,), seq_len=teacher_len(cfg), vocab_size=v,
                                        **common)
                        for dm, v in zip(d.domains, o.teacher_vocab_sizes, strict=True)]
            student_tok = mix.tokenizer
            own_toks = [x.tokenizer for x in own_data]
            projections = [build_projection(t, student_tok) for t in own_toks]
            rows = _transfer(cfg, student_tok, own_toks)
            m = rows["mask"]
            availability = ((rows["teacher_available"] * m).sum((1, 2)) / m.sum()).tolist()
        domains = mix.domains
        run.progress = RunProgress(2 * k + cfg.seeds * len(plan), enabled=cfg.progress)
        log(f"{k} domains {list(domains)}; student tokenizer V={student_tok.vocab_size}, "
            f"teachers' own V={[t.vocab_size for t in own_toks]}; rows of {d.seq_len} "
            f"(teachers' own: {teacher_len(cfg)}); 2 x {k} teachers ({cfg.teachers.size}, "
            f"{cfg.teachers.steps} updates each), student {cfg.student.size}, {cfg.seeds} "
            f"seeds x {len(plan)} trainings; availability "
            + ", ".join(f"{a:.3f}" for a in availability))

        with run.times.stage("teachers"):
            teachers, curves, teacher_rows = _teachers(run, mix, own_data)

        tests = {dm: first_rows(mix.packed[dm]["test"], cfg.test_rows) for dm in domains}
        test_sets = {dm: (s, eval_batches(s, cfg.eval_batch_size)) for dm, s in tests.items()}
        mixed_val, val_domain = mix.mixture("validation")
        val_mix = select_rows(mixed_val, np.concatenate(
            [np.flatnonzero(val_domain == i)[:cfg.val_rows // k] for i in range(k)]))
        models = LMModels(cfg, student_tok.vocab_size)
        steps, tx = _steps(cfg, models, teachers, projections)

        seed_rows, student_curves = [], {}
        try:
            with run.times.stage("students"):
                for seed in range(cfg.seeds):
                    seed_rows.append(_one_seed(run, models, seed, steps, tx, rows, val_mix,
                                               test_sets, student_curves))
            with run.times.stage("step times"):
                saved = run.saved("step times")
                if saved is None:
                    fns, p0 = models.init("student", 0)
                    saved = _step_seconds(steps, init_train_state(p0, tx), rows,
                                          batch_size=cfg.student.batch_size)
                    run.save("step times", saved)
        except KeyboardInterrupt:
            run.progress.close()
            result = None
            if seed_rows:
                result = _report(run, seed_rows, teacher_rows, availability, None,
                                 own_toks, student_tok, time.perf_counter() - start)
            from mtkd_jax.experiment.runner import Interrupted

            raise Interrupted(run.out, result) from None
    run.progress.close()
    return _report(run, seed_rows, teacher_rows, availability, saved, own_toks, student_tok,
                   time.perf_counter() - start)


def _one_seed(run, models, seed, steps, tx, rows, val_mix, test_sets, curves) -> dict:
    """Every row of one seed (finished rows read from the run folder); `{row: flat metrics}`."""
    cfg = run.cfg
    s = cfg.student
    fns, p0 = models.init("student", seed)
    eval_fn = nll_eval(run, models.cached("student eval", lambda: make_eval_step(
        fns.logits, None)), val_mix)
    ev_test = models.cached("student test", lambda: student_test_step(fns.logits,
                                                                     models.vocab_size))
    out = {}
    for row, (step, teachers) in steps.items():
        name = f"seed {seed}: {row}"
        saved = run.saved(name)
        if saved is None:
            def batches_fn(e, start, teachers=teachers, seed=seed):
                return _batches(rows, batch_size=s.batch_size, seed=seed, epoch=e,
                                start=start, teachers=teachers)

            state, curve = train_model(
                run, name, init_train_state(p0, tx), step, batches_fn, steps=s.steps,
                steps_per_epoch=rows["x"].shape[0] // s.batch_size, eval_fn=eval_fn,
                seed=1000 + seed)
            with run.times.stage("evaluation"):
                metrics = flatten(eval_student(ev_test, state.params, test_sets))
            saved = {"metrics": metrics, "curve": curve}
            run.save(name, saved)
        else:
            run.progress.start(name)
            run.progress.finished()
        out[row] = saved["metrics"]
        curves[name] = saved["curve"]
    return out


# ---------------------------------------------------------------------------- report
def _gain_kept(seed_rows) -> dict[str, list[float]]:
    """Per row and seed, the fraction of the shared row's bpb gain over ``alone`` kept
    (NaN where the shared row does not gain)."""
    out = {}
    for row in seed_rows[0]:
        if row == "alone":
            continue
        out[row] = []
        for s in seed_rows:
            gain = s["alone"]["bpb"] - s[_SHARED]["bpb"]
            out[row].append((s["alone"]["bpb"] - s[row]["bpb"]) / gain if gain > 0
                            else float("nan"))
    return out


def _report(run, seed_rows, teacher_rows, availability, step_seconds, own_toks, student_tok,
            seconds) -> dict:
    cfg, out = run.cfg, run.out
    domains = [dm for dm in seed_rows[0]["alone"] if dm.endswith("/bpb")]
    domains = [dm[: -len("/bpb")] for dm in domains]
    table = report.aggregate(seed_rows)
    kept = _gain_kept(seed_rows)
    n = len(seed_rows)

    def pm(values, fmt="{:.3f}"):
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "n/a"
        mean = float(np.mean(values))
        if n == 1:
            return fmt.format(mean)
        return f"{fmt.format(mean)} ± {fmt.format(float(np.std(values, ddof=1)))}"

    head = ["row", "mixture bpb", "gain kept (of shared)", "teacher availability",
            "step time / shared", *[f"{dm} bpb" for dm in domains]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in table:
        row = rec["row"]
        avail = ("1 (each)" if row == _SHARED else
                 " / ".join(f"{a:.3f}" for a in availability) if row.startswith(_OWN)
                 else "")
        ratio = (f"{step_seconds[row] / step_seconds[_SHARED]:.2f}" if step_seconds
                 and row in step_seconds else "")
        lines.append("| " + " | ".join([
            row, pm([s[row]["bpb"] for s in seed_rows]),
            pm([100 * v for v in kept[row]], "{:.0f}%") if row in kept else "",
            avail, ratio, *[pm([s[row][f"{dm}/bpb"] for s in seed_rows]) for dm in domains]])
            + " |")
    tlines = ["| teacher | tokenizer V | test bpb on its domain |", "|---|---|---|"]
    for name, r in teacher_rows.items():
        tlines.append(f"| {name} | {r['vocab_size']} | {r['bpb']:.3f} |")
    best = None
    own_rows = [r for r in kept if r.startswith(_OWN)]
    if own_rows:
        best = max(own_rows, key=lambda r: np.nanmean(kept[r]) if not all(
            math.isnan(v) for v in kept[r]) else -np.inf)
    times = "; ".join(f"{s} {w:.0f} s" for s, w in run.times.wall.items())
    d, o, s = cfg.data, cfg.own_tokenizers, cfg.student
    checks = []
    if best is not None:
        mean = float(np.nanmean(kept[best])) if not all(math.isnan(v) for v in kept[best]) \
            else float("nan")
        checks.append(f"- Best method: `{best}`, keeps {100 * mean:.0f}% of the shared "
                      f"tokenizer's gain over alone (goal: >= 80%): "
                      f"{'met' if mean >= 0.8 else 'not met'}.")
    if step_seconds:
        own = sorted((r for r in step_seconds if r.startswith(_OWN)),
                     key=lambda r: step_seconds[r])
        for label, row in (("Best method's", best), ("Slowest", own[-1] if own else None)):
            if row is None or row not in step_seconds:
                continue
            ratio = step_seconds[row] / step_seconds[_SHARED]
            checks.append(f"- {label} aligned step (`{row}`): {ratio:.2f}x the shared step "
                          f"(goal: <= 1.3x; same process, same batch; the aligned teachers "
                          f"read rows of {teacher_len(cfg)} tokens, the shared ones "
                          f"{d.seq_len}).")
    md = "\n".join([
        "# Language models, teachers with their own tokenizers -> one student", "",
        f"{len(domains)} domains ({', '.join(domains)}). Student tokenizer: byte-level BPE, "
        f"V = {student_tok.vocab_size}, trained on the mixture; rows of {d.seq_len} tokens. "
        f"Teachers' own tokenizers (one per domain, trained on it): V = "
        f"{', '.join(str(t.vocab_size) for t in own_toks)}; their rows hold "
        f"{teacher_len(cfg)} tokens. Teachers: `{cfg.teachers.size}` transformers, "
        f"{cfg.teachers.steps} updates of {cfg.teachers.batch_size} rows on their own domain, "
        f"once with their own tokenizer and once with the student's (the shared reference); "
        f"all trained once and shared by the {cfg.seeds} seed(s) (seeds vary the student's "
        f"initial weights and data order). Student: `{s.size}`, {s.steps} updates of "
        f"{s.batch_size} rows of {s.transfer_rows} mixture training rows; weighting "
        f"`{o.weighting}`, KL at T = {cfg.temperature} mixed with CE (alpha {cfg.alpha}), "
        f"chunked loss ({cfg.chunk_size} positions); ULD: top {o.uld_size} unmatched "
        f"probabilities, weight {o.uld_weight}.", "",
        "Test bits per UTF-8 byte (each student's own tokens; comparable across tokenizers), "
        f"mean ± std over {n} seed(s). Gain kept: (alone - row) / (alone - shared tokenizer) "
        "per seed. Teacher availability: the fraction of the student's transfer tokens each "
        "teacher is aligned at (a token ends at the same byte). Step time: median seconds of "
        "one update on the same batch, relative to the shared step, measured in one process.",
        "", *lines, "",
        *(["Checks:", "", *checks, ""] if checks else []),
        "Teachers (one run each):", "", *tlines, "",
        f"Wall time {seconds:.0f} s ({times}; JAX compile {run.times.compile_seconds:.0f} s).",
        "",
    ])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    result = {"table": table, "seeds": seed_rows, "teachers": teacher_rows,
              "availability": availability, "step_seconds": step_seconds,
              "gain_kept": kept, "seconds": seconds, "stage_seconds": run.times.wall,
              "compile_seconds": run.times.compile_seconds}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return {**result, "markdown": md}

