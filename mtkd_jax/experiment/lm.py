"""The language-model experiment (``mtkd lm``): domain-expert transformer teachers, one student.

One teacher per text domain (`mtkd_jax.data.prepare_lm_data`: real text, a byte-level BPE
tokenizer, packed rows), each a `mtkd_jax.models.transformer.Transformer` trained on its
own domain only. The teachers are trained once and shared by every seed (seeds vary the
student's initial weights and the order of its data). Per seed, a smaller transformer
student is trained on the domains' mixture (the *transfer rows*: a seeded sample of the
mixture's training rows, the same number of tokens for every row of the table):

* ``alone``: next-token cross-entropy only;
* ``best teacher``: distilled from the single teacher with the lowest mixture validation
  perplexity;
* ``K teachers: <weighting>``: distilled from all teachers, per-token weights from each
  configured weighting (``uniform``, ``confidence``, ``entropy``, ``posterior``: the router);
  each from the top-k teacher cache and once more with online teachers (``... (online)``,
  `online_weightings`).

Test metrics per domain and on the mixture (per valid token): perplexity, bits per byte
(the NLL in bits over the UTF-8 bytes the tokens stand for, comparable across tokenizers),
token accuracy and agreement with the teacher ensemble. Reference rows: each teacher, their
mean ensemble and the oracle-routed ensemble (each domain's text scored by its own teacher).
Also the average per-token weight each weighting gives each teacher on each domain, the
cache's bytes per token per teacher, wall / compile / per-stage times, learning curves, a
per-domain bar plot and TensorBoard scalars. Every training checkpoints under the run
folder and a rerun resumes it; finished rows are kept in ``rows/`` and not run again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtkd_jax.cache import (
    DEFAULT_FILL,
    TopK,
    build_cache,
    open_cache,
    with_cached_logits,
    with_cached_top_k,
)
from mtkd_jax.cache.topk import FILLS
from mtkd_jax.core.vocab_projection import PROJECTION_METHODS
from mtkd_jax.data import LMData, PackedSplit, prepare_lm_data
from mtkd_jax.data.packing import batches as packed_batches
from mtkd_jax.experiment import report
from mtkd_jax.experiment.config import ConfigError
from mtkd_jax.experiment.lm_run import (
    METRICS,
    MIX,
    LMModels,
    LMRun,
    eval_batches,
    eval_student,
    first_rows,
    flatten,
    mixture_metrics,
    model_batch,
    nll_eval,
    online_teachers,
    optimizer,
    select_rows,
    student_test_step,
    train_model,
    train_teacher,
    with_bpb,
)
from mtkd_jax.experiment.lm_xtok import run_lm_xtok
from mtkd_jax.experiment.progress import RunProgress, log
from mtkd_jax.models.transformer import PRESETS
from mtkd_jax.objective.targets import fuse_targets
from mtkd_jax.training.checkpoint import params_fingerprint
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step, make_supervised_step
from mtkd_jax.weighting import WEIGHTINGS, get_weighting

__all__ = ["LM_HELP", "METRICS", "lm_config", "quick_lm", "run_lm", "validate_lm_config"]

_MIX = MIX
_CACHE_TAILS = ("bucket",) + FILLS
"""How the cached rows read a teacher's tail: ``"bucket"`` (the entries as stored, the tail
one slot: `mtkd_jax.objective.top_k_slots`), or expanded to the vocabulary with a fill."""


# ---------------------------------------------------------------------------- config
def lm_config() -> ml_collections.ConfigDict:
    """The default experiment (``mtkd lm``, experiments/configs/lm.py).

    Three domains of real text (Python standard-library code, Python documentation prose,
    Shakespeare's plays), a byte-level BPE tokenizer of 8192 tokens, rows of 128 tokens; one
    ``small`` transformer teacher per domain (400 updates of 16 rows on its own domain,
    trained once and shared by the seeds); per seed a ``tiny`` student (160 updates of 8
    rows, one pass over a fixed sample of 1280 mixture rows): alone, from the best single
    teacher and from all teachers with ``uniform``, ``confidence``, ``entropy`` and
    ``posterior``, each from a cache of the top-64 plus 64 slots sampled from each
    teacher's tail (read as slots, never expanded to V: ``cache_fill="bucket"``) and with
    online teachers; 3 seeds. The cross-entropy's weight in the
    loss, `alpha`, is 0.1 for the students from all teachers and 0.8 for the best single
    teacher's (`best_teacher_alpha`), each the better of 0.1 / 0.5 / 0.8 on the validation
    split of seed 0 (docs/results/lm.md); 1 is the student alone.

    With ``tokenizers="own"`` every teacher has its own tokenizer
    (`own_tokenizers.teacher_vocab_sizes`, one per domain) and the run is
    `mtkd_jax.experiment.lm_xtok`'s (experiments/configs/lm_xtok.py sets its sizes).

    Example:
      >>> from mtkd_jax.experiment.lm import lm_config
      >>> c = lm_config()
      >>> c.data.vocab_size, c.teachers.size, c.student.size, c.seeds
      (8192, 'small', 'tiny', 3)
    """
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/lm"
    c.seeds = 3
    c.progress = True
    c.checkpoints = True
    c.save_every = 100
    c.log_every = 20
    c.evals_per_training = 4
    c.eval_batch_size = 32
    c.val_rows = 48
    c.test_rows = 128
    c.temperature = 1.0
    c.alpha = 0.1
    c.best_teacher_alpha = 0.8
    c.chunk_size = 32
    c.cache_top_k = 64
    c.cache_tail_samples = 64
    c.cache_fill = "bucket"
    c.weightings = ("uniform", "confidence", "entropy", "posterior")
    c.posterior_sharpness = 1.0
    c.online_weightings = ("uniform", "confidence", "entropy", "posterior")
    c.tokenizers = "shared"
    c.own_tokenizers = ml_collections.ConfigDict(dict(
        teacher_vocab_sizes=(4096, 6144, 8192), teacher_len=0, methods=("prefix", "uld"),
        weighting="confidence", uld_size=16, uld_weight=1.0))
    c.data = ml_collections.ConfigDict(dict(
        domains=("python_code", "python_docs", "shakespeare"), vocab_size=8192, seq_len=128,
        max_documents=0))
    c.teachers = ml_collections.ConfigDict(dict(
        size="small", model_kwargs={}, steps=400, batch_size=16, learning_rate=3e-3,
        warmup_steps=30, weight_decay=0.01))
    c.student = ml_collections.ConfigDict(dict(
        size="tiny", model_kwargs={}, steps=160, batch_size=8, transfer_rows=1280,
        learning_rate=3e-3, warmup_steps=12, weight_decay=0.01))
    return c


def quick_lm(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` shrunk to a test-sized run (``mtkd lm --quick``), in place: one seed, 40
    documents per split, V = 512, rows of 32 tokens, narrow one-block models (they compile
    fast), a few updates, the
    ``uniform`` and ``posterior`` rows; run folder ``<output_dir>_quick``.

    Example:
      >>> from mtkd_jax.experiment.lm import lm_config, quick_lm
      >>> quick_lm(lm_config()).output_dir
      'runs/lm_quick'
    """
    cfg.output_dir = f"{cfg.output_dir.rstrip('/')}_quick"
    cfg.seeds = 1
    cfg.progress = False
    cfg.weightings = ("uniform", "posterior")
    cfg.online_weightings = ("posterior",)
    cfg.own_tokenizers.teacher_vocab_sizes = (300, 360, 420, 480)[:len(cfg.data.domains)]
    cfg.val_rows, cfg.test_rows, cfg.eval_batch_size = 12, 8, 8
    cfg.cache_top_k, cfg.cache_tail_samples, cfg.chunk_size = 8, 8, 16
    cfg.data.update(dict(seq_len=32, vocab_size=512, max_documents=40))
    cfg.teachers.update(dict(size="tiny", steps=6, batch_size=8, warmup_steps=2))
    cfg.student.update(dict(steps=4, batch_size=8, transfer_rows=32, warmup_steps=1))
    with cfg.teachers.model_kwargs.unlocked():
        cfg.teachers.model_kwargs.update(dict(dim=32, mlp_dim=64, depth=1))
    with cfg.student.model_kwargs.unlocked():
        cfg.student.model_kwargs.update(dict(dim=16, heads=2, kv_heads=1, mlp_dim=32,
                                             depth=1))
    return cfg


LM_HELP: dict[str, str] = {
    "output_dir": "the run folder (results.md, results.json, plots, TensorBoard, checkpoints, "
                  "caches, finished rows)",
    "seeds": "student seeds (initial weights and data order); the teachers are trained once",
    "progress": "show the whole-run progress bar and each training's bar",
    "checkpoints": "checkpoint every training (a rerun resumes it)",
    "save_every": "updates between checkpoints of a training",
    "log_every": "updates between TensorBoard points",
    "evals_per_training": "validation points per training (learning curves)",
    "eval_batch_size": "rows per evaluation batch",
    "val_rows": "validation rows (per domain for a teacher; in all for the students)",
    "test_rows": "test rows per domain, at most (the same rows for every row of the table)",
    "temperature": "distillation temperature T",
    "alpha": "weight of the next-token cross-entropy in the loss of the students from all "
             "teachers (1 - alpha: KL)",
    "best_teacher_alpha": "the same weight for the student from the best single teacher (its "
                          "own: one teacher that knows one domain is worth less weight)",
    "chunk_size": "positions per chunk of the student's soft loss",
    "cache_top_k": "log-probabilities kept per token and teacher in the cache (the next "
                   "token's always among them)",
    "cache_tail_samples": "more slots per token and teacher that hold a sample of the "
                          "distribution outside the top-k (mtkd_jax.cache.topk.sample_tail: "
                          "unbiased, where the top-k alone drops the tail); 0 for none",
    "cache_fill": "how a cached distribution's tail is read: 'bucket' (kept as one slot, "
                  "never expanded: mtkd_jax.objective.top_k_slots), or expanded to the "
                  "vocabulary with 'uniform', 'prior' (the transfer text's token "
                  "frequencies) or 'renormalize' (mtkd_jax.cache.topk)",
    "weightings": "per-token teacher weightings, one student row each (from the cache)",
    "posterior_sharpness": "the posterior weighting's sharpness s (1: Bayes' rule)",
    "online_weightings": "weightings also trained with online teachers, one student row each "
                         "(() for none)",
    "tokenizers": "'shared': one tokenizer for every model; 'own': each teacher has its own "
                  "tokenizer, the student another (mtkd_jax.experiment.lm_xtok; "
                  "experiments/configs/lm_xtok.py)",
    "own_tokenizers.teacher_vocab_sizes": "with tokenizers='own': each teacher's tokenizer "
                                          "size, one per domain (trained on that domain)",
    "own_tokenizers.teacher_len": "with tokenizers='own': tokens per teacher row (0: 2 x "
                                  "data.seq_len)",
    "own_tokenizers.methods": "with tokenizers='own': vocabulary projections, one student row "
                              "each (prefix, uld)",
    "own_tokenizers.weighting": "with tokenizers='own': the per-token weighting of every "
                                "distilled row (the shared-tokenizer reference's too)",
    "own_tokenizers.uld_size": "with method uld: unmatched probabilities kept per teacher "
                               "and token (the rest compared by their mass)",
    "own_tokenizers.uld_weight": "with method uld: the weight of ULD's sorted L1 term",
    "data.domains": "text domains (built-in: python_code, python_docs, shakespeare)",
    "data.vocab_size": "tokenizer vocabulary V (a byte-level BPE trained on the train splits)",
    "data.seq_len": "tokens per packed row",
    "data.max_documents": "documents per split of each domain, at most (0: all)",
    "teachers.size": f"the teachers' transformer preset ({', '.join(sorted(PRESETS))})",
    "teachers.steps": "updates of each teacher on its own domain",
    "teachers.batch_size": "rows per teacher update",
    "teachers.learning_rate": "peak AdamW learning rate (warmup, then cosine decay)",
    "teachers.warmup_steps": "linear warmup updates",
    "teachers.weight_decay": "AdamW weight decay",
    "student.size": f"the student's transformer preset ({', '.join(sorted(PRESETS))})",
    "student.steps": "updates of every student row",
    "student.batch_size": "rows per student update",
    "student.transfer_rows": "mixture training rows the students learn from (fixed sample)",
    "student.learning_rate": "peak AdamW learning rate (warmup, then cosine decay)",
    "student.warmup_steps": "linear warmup updates",
    "student.weight_decay": "AdamW weight decay",
}
"""`mtkd lm --help`: the meaning of every key (`model_kwargs.*` override preset fields)."""


def validate_lm_config(cfg) -> None:
    """Check an LM config before anything trains; `ConfigError` naming the key."""
    def require(ok, message):
        if not ok:
            raise ConfigError(message)

    def get(path):
        value = cfg
        for part in path.split("."):
            value = value[part]
        return value

    for path in ("seeds", "save_every", "log_every", "evals_per_training", "eval_batch_size",
                 "val_rows", "test_rows", "chunk_size", "cache_top_k", "data.vocab_size",
                 "data.seq_len", "teachers.steps", "teachers.batch_size", "student.steps",
                 "student.batch_size", "student.transfer_rows"):
        v = get(path)
        require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"`config.{path}` must be an int >= 1, got {v!r}.")
    for path in ("temperature", "posterior_sharpness", "teachers.learning_rate",
                 "student.learning_rate"):
        v = get(path)
        require(isinstance(v, float | int) and v > 0,
                f"`config.{path}` must be a number > 0, got {v!r}.")
    for name in ("alpha", "best_teacher_alpha"):
        v = cfg[name]
        require(isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v <= 1,
                f"`config.{name}` must be a number in [0, 1], got {v!r}.")
    require(len(cfg.data.domains) >= 2,
            f"`config.data.domains` must name at least 2 domains (one teacher each), got "
            f"{tuple(cfg.data.domains)}.")
    for section in ("teachers", "student"):
        require(cfg[section].size in PRESETS,
                f"`config.{section}.size` must be one of {sorted(PRESETS)}, got "
                f"{cfg[section].size!r}.")
    for name in (*cfg.weightings, *cfg.online_weightings):
        require(name in WEIGHTINGS,
                f"`config.weightings` / `online_weightings` must be names from "
                f"{sorted(WEIGHTINGS)}, got {name!r}.")
    require(cfg.cache_fill in _CACHE_TAILS,
            f"`config.cache_fill` must be one of {_CACHE_TAILS}, got {cfg.cache_fill!r}.")
    require(cfg.tokenizers in ("shared", "own"),
            f"`config.tokenizers` must be 'shared' or 'own', got {cfg.tokenizers!r}.")
    o = cfg.own_tokenizers
    require(len(o.teacher_vocab_sizes) == len(cfg.data.domains)
            and all(isinstance(v, int) and v >= 64 for v in o.teacher_vocab_sizes),
            f"`config.own_tokenizers.teacher_vocab_sizes` must hold one int >= 64 per domain "
            f"({len(cfg.data.domains)}), got {tuple(o.teacher_vocab_sizes)}.")
    require(len(o.methods) >= 1 and all(m in PROJECTION_METHODS for m in o.methods),
            f"`config.own_tokenizers.methods` must be names from {PROJECTION_METHODS}, got "
            f"{tuple(o.methods)}.")
    require(o.weighting in WEIGHTINGS,
            f"`config.own_tokenizers.weighting` must be one of {sorted(WEIGHTINGS)}, got "
            f"{o.weighting!r}.")
    for name in ("teacher_len", "uld_size"):
        v = o[name]
        require(isinstance(v, int) and not isinstance(v, bool) and v >= (name == "uld_size"),
                f"`config.own_tokenizers.{name}` must be an int >= "
                f"{int(name == 'uld_size')}, got {v!r}.")
    require(isinstance(o.uld_weight, float | int) and o.uld_weight >= 0,
            f"`config.own_tokenizers.uld_weight` must be a number >= 0, got {o.uld_weight!r}.")
    m = cfg.cache_tail_samples
    require(isinstance(m, int) and not isinstance(m, bool) and m >= 0,
            f"`config.cache_tail_samples` must be an int >= 0, got {m!r}.")
    require(cfg.cache_top_k + m <= cfg.data.vocab_size,
            f"`config.cache_top_k` + `config.cache_tail_samples` ({cfg.cache_top_k} + {m}) "
            f"must be <= `config.data.vocab_size` ({cfg.data.vocab_size}).")


def _weighting(cfg, name: str):
    return get_weighting(name, **({"sharpness": cfg.posterior_sharpness}
                                  if name == "posterior" else {}))


# ---------------------------------------------------------------------------- data
def _transfer_rows(data: LMData, num_rows: int) -> tuple[PackedSplit, np.ndarray]:
    """A fixed sample of `num_rows` mixture training rows (the same for every seed and row)
    and each row's domain index."""
    mixed, domain = data.mixture("train")
    if num_rows > len(mixed):
        raise ValueError(f"`student.transfer_rows` = {num_rows} is more than the "
                         f"{len(mixed)} training rows of the mixture.")
    idx = np.sort(np.random.default_rng(0).permutation(len(mixed))[:num_rows])
    return select_rows(mixed, idx), domain[idx]


# ---------------------------------------------------------------------------- the run
def _teachers(run, data: LMData, models: LMModels):
    """Train (or restore) one teacher per domain; returns (fns, params tuple, curves)."""
    cfg = run.cfg
    params, curves = [], {}
    for k, domain in enumerate(data.domains):
        name = f"teacher {domain}"
        fns, p, curves[name] = train_teacher(
            run, models, name, data.packed[domain]["train"],
            first_rows(data.packed[domain]["validation"], cfg.val_rows), seed=k)
        params.append(p)
    return fns, tuple(params), curves


def _stack_logits(fns) -> Callable:
    return lambda tps, x: jnp.stack([fns.logits(p, x) for p in tps])  # [K, B, L, V]


def _teacher_pass(run, data, teacher_fn, t_params, tests) -> dict:
    """One pass of the teachers over each domain's test batches. Returns the average per-token
    weight each weighting gives each teacher, `{weighting: [[w per teacher] per domain]}`, and
    stores the ensemble's predicted token (argmax of the mean teacher probabilities at T = 1,
    the ensemble of `make_eval_step`) in each test batch as ``"ensemble_pred"`` `[B, L]`, so
    the student rows measure their agreement without running the teachers again."""
    cfg = run.cfg
    names = list(dict.fromkeys([*cfg.weightings, *cfg.online_weightings]))
    fns = [_weighting(cfg, name) for name in names]

    @jax.jit
    def one(tp, batch):
        z = teacher_fn(tp, batch["x"])  # [K, B, L, V]
        p = jax.nn.softmax(z / cfg.temperature)
        w = [fn(p, logits=z, labels=batch["y"], label_mask=batch["mask"]) for fn in fns]
        w = jnp.stack(w) if w else jnp.zeros((0, *z.shape[:-1]))  # [W, K, B, L]
        k = z.shape[0]
        ens = fuse_targets(jax.nn.softmax(z.astype(jnp.float32)), jnp.full((k,), 1.0 / k))
        return (jnp.sum(w * batch["mask"], axis=(2, 3)), jnp.sum(batch["mask"]),
                jnp.argmax(ens, axis=-1).astype(jnp.int32))

    per_domain = []
    for d in data.domains:
        parts = []
        for b in tests[d]:
            w_sum, n, pred = one(t_params, {k: v for k, v in b.items() if k != "ensemble_pred"})
            b["ensemble_pred"] = np.asarray(pred)
            parts.append((w_sum, n))
        total = np.sum([np.asarray(a) for a, _ in parts], axis=0)  # [W, K]
        per_domain.append(total / sum(float(n) for _, n in parts))
    return {name: [per_domain[i][j].tolist() for i in range(len(data.domains))]
            for j, name in enumerate(names)}


def run_lm(cfg) -> dict:
    """Run the experiment of `cfg` (`experiments/configs/lm.py`); results.md, results.json,
    PNG plots and TensorBoard events in `cfg.output_dir`. With ``cfg.tokenizers == "own"``
    (teachers with their own tokenizers) the run is `mtkd_jax.experiment.lm_xtok.run_lm_xtok`.

    Returns:
      `{"table", "seeds", "teachers", "markdown", "seconds"}` (and `run_lm_xtok`'s keys with
      own tokenizers).
    """
    validate_lm_config(cfg)
    if cfg.tokenizers == "own":
        return run_lm_xtok(cfg)
    start = time.perf_counter()
    run = LMRun(cfg)
    d = cfg.data
    with run.times.listening():
        with run.times.stage("data"):
            data = prepare_lm_data(tuple(d.domains), seq_len=d.seq_len, seed=0,
                                   vocab_size=d.vocab_size,
                                   max_documents=d.max_documents or None)
        domains = data.domains
        vocab = data.tokenizer.vocab_size
        models = LMModels(cfg, vocab)
        k = len(domains)
        multi = [f"{k} teachers: {w}" for w in cfg.weightings]
        rows_per_seed = 1 + 1 + len(multi) + len(cfg.online_weightings)
        run.progress = RunProgress(k + cfg.seeds * rows_per_seed, enabled=cfg.progress)
        log(f"{k} domains {list(domains)}, tokenizer V={vocab} "
            f"({data.tokenizer.fingerprint[:12]}), rows of {d.seq_len} tokens; "
            f"{k} teachers ({cfg.teachers.size}, {cfg.teachers.steps} updates each), "
            f"student {cfg.student.size}, {cfg.seeds} seeds x {rows_per_seed} trainings")

        with run.times.stage("teachers"):
            t_fns, t_params, curves = _teachers(run, data, models)
        teacher_fn = _stack_logits(t_fns)
        run_teachers = jax.jit(teacher_fn)

        # Test and validation rows (capped per domain, the same for every row of the table).
        tests = {dm: first_rows(data.packed[dm]["test"], cfg.test_rows) for dm in domains}
        test_sets = {dm: (s, eval_batches(s, cfg.eval_batch_size)) for dm, s in tests.items()}
        mixed_val, val_domain = data.mixture("validation")
        val_mix = select_rows(mixed_val, np.concatenate(  # val_rows in all, as many per domain
            [np.flatnonzero(val_domain == i)[:cfg.val_rows // k] for i in range(k)]))

        with run.times.stage("teacher evaluation"):
            ev_t = make_eval_step(None, teacher_fn)
            teacher_rows = {}
            per_domain = {}
            for dm, (split, batches) in test_sets.items():
                stats = evaluate(ev_t, None, batches, teacher_params=t_params,
                                 teacher_names=[f"teacher {x}" for x in domains])
                per_domain[dm] = {r: with_bpb(m, split) for r, m in stats.items()}
            for r in [f"teacher {x}" for x in domains] + ["ensemble"]:
                teacher_rows[r] = {dm: per_domain[dm][r] for dm in domains}
            teacher_rows["oracle-routed ensemble"] = {
                dm: per_domain[dm][f"teacher {dm}"] for dm in domains}
            for r in teacher_rows.values():
                r[_MIX] = mixture_metrics(r)
            val_stats = evaluate(ev_t, None, eval_batches(val_mix, cfg.eval_batch_size),
                                 teacher_params=t_params)
            best = int(np.argmin([val_stats[f"teacher_{i}"]["nll"] for i in range(k)]))
            weights = _teacher_pass(
                run, data, teacher_fn, t_params, {dm: b for dm, (_, b) in test_sets.items()})

        with run.times.stage("cache"):
            transfer, _ = _transfer_rows(data, cfg.student.transfer_rows)
            fp = data.tokenizer.fingerprint
            path = os.path.join(run.out, "cache", "transfer")
            # The tail of each cached distribution: evenly ("uniform"), or by the transfer
            # text's token frequencies plus one ("prior"; worse here, docs/results/lm.md).
            prior = None
            fill = DEFAULT_FILL if cfg.cache_fill == "bucket" else cfg.cache_fill
            if cfg.cache_fill == "prior":
                prior = np.bincount(transfer.y[transfer.mask > 0], minlength=vocab) + 1.0
            try:  # reused only if built from these teachers, rows, tokenizer and k
                cache = open_cache(path, expect_fingerprint=params_fingerprint(t_params),
                                   expect_tokenizer=fp, fill=fill, prior=prior)
                if (cache.top_k, cache.tail_samples, cache.num_examples,
                        cache.header.get("keeps_labels")) != (
                        cfg.cache_top_k, cfg.cache_tail_samples, len(transfer), True):
                    raise ValueError("another cache")
            except (FileNotFoundError, ValueError):
                build_cache(
                    path, run_teachers, t_params,
                    (model_batch(b) for b in packed_batches(
                        transfer, batch_size=min(cfg.eval_batch_size, len(transfer)),
                        shuffle=False, drop_remainder=False)),
                    num_examples=len(transfer), top_k=cfg.cache_top_k, keep_labels=True,
                    # The tail's draws: one fixed key, so a rebuilt cache is the same cache.
                    tail_samples=cfg.cache_tail_samples, key=jax.random.PRNGKey(0),
                    tokenizer=fp, overwrite=True, progress=False)
                cache = open_cache(path, expect_tokenizer=fp, fill=fill, prior=prior)
            cache_bytes = cache.bytes_per_example / (d.seq_len * k)

        seed_rows, student_curves = [], {}
        try:
            with run.times.stage("students"):
                for seed in range(cfg.seeds):
                    rows = _one_seed(run, models, seed, transfer, val_mix, cache, test_sets,
                                     t_fns, t_params, best, multi, student_curves)
                    seed_rows.append({r: flatten(v) for r, v in rows.items()})
        except KeyboardInterrupt:
            # Ctrl-C: the finished seeds' report is written; checkpoints and finished rows
            # stay, so the same command resumes.
            run.progress.close()
            result = None
            if seed_rows:
                result = _report(run, cfg, data, seed_rows, teacher_rows, weights, best,
                                 cache_bytes, {**curves, **student_curves},
                                 time.perf_counter() - start)
            from mtkd_jax.experiment.runner import Interrupted

            raise Interrupted(run.out, result) from None
    run.progress.close()
    seconds = time.perf_counter() - start
    return _report(run, cfg, data, seed_rows, teacher_rows, weights, best, cache_bytes,
                   {**curves, **student_curves}, seconds)


def _one_seed(run, models, seed, transfer, val_mix, cache, test_sets, t_fns,
              t_params, best, multi, curves) -> dict:
    cfg = run.cfg
    s = cfg.student
    fns, p0 = models.init("student", seed)
    tx = optimizer(s, s.steps)
    spe = len(transfer) // s.batch_size
    eval_fn = nll_eval(run, models.cached("student eval", lambda: make_eval_step(
        fns.logits, None)), val_mix)
    ev_test = models.cached("student test", lambda: student_test_step(fns.logits,
                                                                      models.vocab_size))
    k = len(t_params)
    plan = [("alone", None, None), ("best teacher", "uniform", [best])]
    plan += [(row, w, None) for row, w in zip(multi, cfg.weightings, strict=True)]
    plan += [(f"{k} teachers: {w} (online)", w, "online") for w in cfg.online_weightings]
    rows = {}
    for row, weighting, which in plan:
        name = f"seed {seed}: {row}"
        saved = run.saved(name)
        if saved is not None:
            rows[row] = saved["metrics"]
            curves[name] = saved["curve"]
            run.progress.start(name)
            run.progress.finished()
            continue
        def build(weighting=weighting, which=which, row=row):
            if weighting is None:
                return jax.jit(make_supervised_step(fns.logits, tx))
            t_apply, t_head = online_teachers(t_fns) if which == "online" else (None, None)
            return jax.jit(make_distill_step(
                fns.features, t_apply, tx, student_head=fns.head, teacher_head=t_head,
                chunk_size=cfg.chunk_size,
                temperature=cfg.temperature,
                alpha=cfg.best_teacher_alpha if row == "best teacher" else cfg.alpha,
                weighting=_weighting(cfg, weighting)))

        step = models.cached(("student step", row), build)
        if which == "online":
            train_step = lambda st, b, key, step=step: step(st, b, key, teacher_params=t_params)  # noqa: E731
        else:
            train_step = step

        def batches_fn(e, start, which=which, weighting=weighting, seed=seed):
            stream = (model_batch(b) for b in packed_batches(
                transfer, batch_size=s.batch_size, seed=seed, epoch=e, start=start))
            if weighting is None or which == "online":
                yield from stream
                return
            if cfg.cache_fill == "bucket":  # the entries as stored: the slot-space loss
                for b in with_cached_top_k(stream, cache):
                    if which is not None:
                        b["teacher_top_k"] = TopK(*(a[np.asarray(which)]
                                                    for a in b["teacher_top_k"]))
                    yield b
                return
            for b in with_cached_logits(stream, cache):
                if which is not None:
                    b["teacher_logits"] = b["teacher_logits"][np.asarray(which)]
                yield b

        state, curve = train_model(run, name, init_train_state(p0, tx), train_step, batches_fn,
                              steps=s.steps, steps_per_epoch=spe, eval_fn=eval_fn,
                              seed=1000 + seed)
        with run.times.stage("evaluation"):
            metrics = eval_student(ev_test, state.params, test_sets)
        rows[row] = metrics
        curves[name] = curve
        run.save(name, {"metrics": metrics, "curve": curve})
    return rows


# ---------------------------------------------------------------------------- report
def _cache_name(cfg) -> str:
    """"top-64", or "top-64 + 64 sampled" with a sampled tail."""
    tail = f" + {cfg.cache_tail_samples} sampled" if cfg.cache_tail_samples else ""
    return f"top-{cfg.cache_top_k}{tail}"


def _paired(seed_rows, row, base, metric="perplexity") -> tuple[float, float, int]:
    ratios = [r[row][metric] / r[base][metric] for r in seed_rows]
    return (float(np.mean(ratios)), float(np.std(ratios, ddof=1)) if len(ratios) > 1 else 0.0,
            sum(x < 1 for x in ratios))


def _report(run, cfg, data, seed_rows, teacher_rows, weights, best, cache_bytes, curves,
            seconds) -> dict:
    out = run.out
    domains = data.domains
    teacher_flat = {r: flatten(v) for r, v in teacher_rows.items()}
    table = report.aggregate([{**teacher_flat, **s} for s in seed_rows])
    for rec in table:
        rec["group"] = "teachers" if rec["row"] in teacher_flat else "students"
        if rec["row"] in teacher_flat:
            rec["n_seeds"] = 0  # trained once, shared by the seeds
    cols = ["perplexity", "bpb", "accuracy", "agreement"]
    dom_cols = [f"{dm}/perplexity" for dm in domains]

    def cell(rec, m):
        mean, std = rec.get(f"{m}_mean"), rec.get(f"{m}_std", 0.0)
        if mean is None:
            return ""
        return f"{mean:.3f}" if rec["n_seeds"] == 0 else f"{mean:.3f} ± {std:.3f}"

    head = ["row", *[f"mixture {c}" for c in cols], *dom_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in table:
        lines.append("| " + " | ".join([rec["row"], *[cell(rec, c) for c in cols + dom_cols]])
                     + " |")
    k = len(domains)
    checks = []
    multi = [r for r in seed_rows[0] if r.startswith(f"{k} teachers")]
    for row in multi:
        mean, std, wins = _paired(seed_rows, row, "best teacher")
        better_all = all(all(s[row][f"{dm}/perplexity"] < s["alone"][f"{dm}/perplexity"]
                             for dm in domains) for s in seed_rows)
        checks.append(f"- {row}: mixture perplexity {mean:.3f} ± {std:.3f} x the best single "
                      f"teacher's student (lower on {wins}/{len(seed_rows)} seeds); below the "
                      f"student alone on every domain and seed: {'yes' if better_all else 'no'}.")
    uniform = f"{k} teachers: uniform"
    for w in cfg.weightings:  # each weighting against the uniform mean, both from the cache
        row = f"{k} teachers: {w}"
        if w != "uniform" and row in seed_rows[0] and uniform in seed_rows[0]:
            mean, std, wins = _paired(seed_rows, row, uniform)
            checks.append(f"- {row} vs uniform: perplexity ratio {mean:.3f} ± {std:.3f} "
                          f"(lower on {wins}/{len(seed_rows)} seeds).")
    for w in cfg.online_weightings:
        row = f"{k} teachers: {w}"
        if row in seed_rows[0] and f"{row} (online)" in seed_rows[0]:
            mean, std, _ = _paired(seed_rows, row, f"{row} (online)")
            checks.append(f"- {_cache_name(cfg)} cache vs online ({w}): perplexity ratio "
                          f"{mean:.4f} ± {std:.4f}.")
    wlines = ["| weighting | " + " | ".join(f"teacher {x}" for x in domains) + " |",
              "|" + "---|" * (k + 1)]
    for name, per in weights.items():
        for dm, w in zip(domains, per, strict=True):
            wlines.append(f"| {name} on {dm} | " + " | ".join(f"{v:.3f}" for v in w) + " |")
    pngs = [_plot_domains(table, domains, os.path.join(out, "domains.png")),
            _plot_curves(curves, os.path.join(out, "learning_curves.png")),
            *([_plot_weights(weights, domains, os.path.join(out, "weights.png"))]
              if weights else [])]
    summary = data.summary()
    times = "; ".join(f"{s} {w:.0f} s" for s, w in run.times.wall.items())
    md = "\n".join([
        "# Language models on real text: domain teachers -> one student", "",
        f"{k} domains ({', '.join(domains)}); byte-level BPE tokenizer, V = "
        f"{data.tokenizer.vocab_size} (fingerprint {data.tokenizer.fingerprint[:12]}); rows "
        f"of {cfg.data.seq_len} tokens. Teachers: `{cfg.teachers.size}` transformers, one per "
        f"domain, {cfg.teachers.steps} updates of {cfg.teachers.batch_size} rows on their own "
        f"domain, trained once and shared by the {cfg.seeds} seeds (seeds vary the student's "
        f"initial weights and data order). Student: `{cfg.student.size}`, {cfg.student.steps} "
        f"updates of {cfg.student.batch_size} rows of {cfg.student.transfer_rows} mixture "
        f"training rows; KL at T = {cfg.temperature} mixed with CE (alpha {cfg.alpha}; "
        f"the best single teacher's student: {cfg.best_teacher_alpha}), chunked "
        f"loss ({cfg.chunk_size} positions). Best single teacher (mixture validation "
        f"perplexity): {domains[best]}. Test rows per domain: at most {cfg.test_rows}.", "",
        "Training tokens per domain: " + ", ".join(
            f"{dm} {summary[dm]['train']['tokens']:,}" for dm in domains) + ".", "",
        "Test metrics per valid token; bpb = bits per UTF-8 byte. Mean ± std over seeds "
        "(teacher rows: one run).", "",
        *lines, "",
        "Checks (paired over seeds):", "", *checks, "",
        "Average per-token teacher weight by domain (test tokens):", "", *wlines, "",
        f"Cache: {_cache_name(cfg)} log-probabilities (the next token's always among the "
        f"top-{cfg.cache_top_k}: `build_cache(keep_labels=True)`"
        + (f"; then {cfg.cache_tail_samples} slots sampled from the rest of each teacher's "
           f"distribution, `build_cache(tail_samples={cfg.cache_tail_samples})`"
           if cfg.cache_tail_samples else "")
        + f"), {cache_bytes:.0f} bytes per token per teacher (DistillKit: about 300 at "
        f"top-128).", "",
        f"Wall time {seconds:.0f} s ({times}; JAX compile {run.times.compile_seconds:.0f} s).",
        "", "Plots: " + ", ".join(os.path.basename(p) for p in pngs), "",
    ])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    result = {"table": table, "seeds": seed_rows, "teachers": teacher_flat, "weights": weights,
              "best_teacher": domains[best], "cache_bytes_per_token_per_teacher": cache_bytes,
              "seconds": seconds, "stage_seconds": run.times.wall,
              "compile_seconds": run.times.compile_seconds}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return {**result, "markdown": md}


# ---------------------------------------------------------------------------- plots
def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _plot_domains(table, domains, path: str) -> str:
    """Grouped bars: test perplexity per domain (and the mixture) for every row."""
    fig = _figure(10, 0.45 * len(table) + 1.5)
    ax = fig.add_subplot(1, 1, 1)
    groups = [*domains, _MIX]
    height = 0.8 / len(groups)
    y = np.arange(len(table))[::-1]
    for i, g in enumerate(groups):
        key = "perplexity" if g == _MIX else f"{g}/perplexity"
        ax.barh(y + (i - len(groups) / 2 + 0.5) * height,
                [r.get(f"{key}_mean", np.nan) for r in table], height,
                xerr=[r.get(f"{key}_std", 0.0) for r in table], label=g)
    ax.set_yticks(y)
    ax.set_yticklabels([r["row"] for r in table], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("test perplexity per valid token (log scale; mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _plot_curves(curves: dict, path: str) -> str:
    """Validation perplexity against updates: every teacher and seed 0's students."""
    fig = _figure(9, 5)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for name, curve in curves.items():
        if not curve or not (name.startswith("teacher") or name.startswith("seed 0")):
            continue
        ax = axes[0] if name.startswith("teacher") else axes[1]
        steps, nll = zip(*curve, strict=True)
        ax.plot(steps, np.exp(nll), marker=".", label=name.replace("seed 0: ", ""))
    for ax, title in zip(axes, ("teachers (own-domain validation)",
                                "students, seed 0 (mixture validation)"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _plot_weights(weights: dict, domains, path: str) -> str:
    """One heat map per weighting: average weight of each teacher (columns) on each
    domain's tokens (rows)."""
    n = len(weights)
    fig = _figure(3.2 * n, 3.2)
    for i, (name, per) in enumerate(weights.items()):
        ax = fig.add_subplot(1, n, i + 1)
        w = np.asarray(per)
        ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        for r in range(w.shape[0]):
            for c in range(w.shape[1]):
                ax.text(c, r, f"{w[r, c]:.2f}", ha="center", va="center",
                        color="white" if w[r, c] < 0.6 else "black", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(domains)))
        ax.set_xticklabels([f"T {x}" for x in domains], rotation=30, fontsize=7)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if i == 0 else [], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
