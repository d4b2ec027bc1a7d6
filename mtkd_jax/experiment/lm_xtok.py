"""Teachers with their own tokenizers distilled into a student with its own (`mtkd lm`-style).

Per domain, a byte-level BPE tokenizer trained on that domain alone (vocabularies of
different sizes, `teacher_vocab_sizes`) and a transformer teacher trained on it; the student
has its own tokenizer, trained on the mixture. The students (one seed each row):

* ``alone``: the student trained on the mixture's next tokens only;
* ``xtok-<method>``: distilled from the teachers with their own tokenizers, aligned by byte
  offsets (`mtkd_jax.data.alignment.pack_aligned`) and projected onto the student's
  vocabulary with `<method>` (``prefix``, ``uld``: `mtkd_jax.core.vocab_projection`);
* ``shared`` (with `same_tokenizer`): the same teachers' architecture trained with the
  *student's* tokenizer on the same domains, distilled through the same code (aligned to
  themselves, identity projections: exactly the shared-vocabulary step), the reference the
  cross-tokenizer students are measured against.

Every student is scored by **bits per byte** on the mixture's test split (its own
tokenizer's rows: bits per byte compare across tokenizers), and the table gives each
distilled row's fraction of the shared row's gain over ``alone`` (NaN when the shared row
does not gain), each teacher's
availability (the fraction of student tokens it is aligned at) and the step time relative to
the shared step (same process). `run_lm_xtok(cfg)` returns the rows; the CLI wiring is the
lead's (`lm_xtok_config()`, `quick_lm_xtok(cfg)`).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mtkd_jax.core.losses import cross_entropy
from mtkd_jax.data.alignment import build_projection, pack_aligned
from mtkd_jax.data.lm_data import prepare_lm_data
from mtkd_jax.models.transformer import Transformer, preset
from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.objective.cross_tokenizer import make_aligned_teachers, student_unmatched
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step, make_supervised_step

__all__ = ["lm_xtok_config", "quick_lm_xtok", "run_lm_xtok"]


def lm_xtok_config() -> ml_collections.ConfigDict:
    """The default run: the three built-in domains, teacher tokenizers of 4096 / 6144 / 8192
    tokens (one per domain), a student tokenizer of 8192, rows of 128 tokens; ``small``
    teachers, a ``tiny`` student; methods ``prefix`` and ``uld``; the shared reference on.

    Example:
      >>> from mtkd_jax.experiment.lm_xtok import lm_xtok_config
      >>> c = lm_xtok_config()
      >>> c.teacher_vocab_sizes, c.methods
      ((4096, 6144, 8192), ('prefix', 'uld'))
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.domains = ("python_code", "python_docs", "shakespeare")
    c.max_documents = 0
    c.seq_len = 128
    c.teacher_len = 0  # 0: 2 * seq_len
    c.student_vocab_size = 8192
    c.teacher_vocab_sizes = (4096, 6144, 8192)
    c.methods = ("prefix", "uld")
    c.same_tokenizer = True
    c.weighting = "confidence"
    c.temperature = 1.0
    c.alpha = 0.5
    c.chunk_size = 32
    c.uld_size = 16
    c.uld_weight = 1.0
    c.test_rows = 128
    c.eval_batch_size = 32
    c.teachers = ml_collections.ConfigDict(dict(size="small", model_kwargs={}, steps=160,
                                                batch_size=32, learning_rate=3e-3))
    c.student = ml_collections.ConfigDict(dict(size="tiny", model_kwargs={}, steps=64,
                                               batch_size=16, transfer_docs=0,
                                               learning_rate=3e-3))
    return c


def quick_lm_xtok(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` shrunk to a test-sized run, in place: 30 documents per split, small
    vocabularies (teachers 300 / 360 / 420, student 400), rows of 32 tokens, narrow models,
    a few updates."""
    cfg.max_documents = 30
    cfg.seq_len = 32
    cfg.student_vocab_size = 400
    cfg.teacher_vocab_sizes = (300, 360, 420)[: len(cfg.domains)]
    cfg.chunk_size, cfg.test_rows, cfg.eval_batch_size = 16, 8, 8
    cfg.teachers.update(dict(size="tiny", steps=4, batch_size=8))
    cfg.student.update(dict(steps=3, batch_size=8, transfer_docs=24))
    with cfg.teachers.model_kwargs.unlocked():
        cfg.teachers.model_kwargs.update(dict(dim=32, mlp_dim=64))
    with cfg.student.model_kwargs.unlocked():
        cfg.student.model_kwargs.update(dict(dim=16, heads=2, kv_heads=1, mlp_dim=32))
    return cfg


def _model(spec, vocab_size: int, max_len: int, seed: int):
    cfg = preset(spec.size, vocab_size=vocab_size, max_len=max_len,
                 **spec.model_kwargs.to_dict())
    return token_model_fns(Transformer(cfg, rngs=nnx.Rngs(seed)))


def _batch(rows: dict, idx) -> dict:
    """Rows (packed split fields, `[K, N, ...]` teacher fields) -> a step's batch."""
    out = {"x": {"tokens": rows["x"][idx], "segment_ids": rows["segment_ids"][idx],
                 "positions": rows["positions"][idx]},
           "y": rows["y"][idx], "mask": rows["mask"][idx]}
    for k, v in rows.items():
        if k.startswith("teacher_"):
            out[k] = v[:, idx]
    return out


def _fields(split) -> dict:
    return {k: np.asarray(getattr(split, k)) for k in ("x", "y", "mask", "segment_ids",
                                                        "positions")}


def _train(step, state, rows: dict, *, steps: int, batch_size: int, seed: int):
    """`steps` updates on random rows; returns the state and the median seconds per update
    after the first (compiling) one."""
    rng = np.random.default_rng(seed)
    n = rows["x"].shape[0]
    times = []
    for i in range(steps):
        idx = np.sort(rng.choice(n, size=min(batch_size, n), replace=False))
        start = time.perf_counter()
        state, metrics = step(state, _batch(rows, idx), jax.random.key(seed))
        jax.block_until_ready(metrics["loss"])
        if i:
            times.append(time.perf_counter() - start)
    return state, metrics, (float(np.median(times)) if times else float("nan"))


def _nll(logits_fn):
    """The jitted summed next-token NLL (nats) of a batch's counted tokens."""

    @jax.jit
    def nll(params, batch):
        ce = cross_entropy(logits_fn(params, batch["x"]), batch["y"])
        return jnp.sum(ce * batch["mask"])

    return nll


def _bits_per_byte(nll, params, split, *, rows: int, batch_size: int) -> float:
    fields = _fields(split)
    n = min(rows, len(split)) if rows else len(split)
    total = 0.0
    for i in range(0, n, batch_size):
        total += float(nll(params, _batch(fields, np.arange(i, min(i + batch_size, n)))))
    return total / math.log(2) / float(np.sum(np.asarray(split.row_bytes)[:n]))


def run_lm_xtok(cfg: ml_collections.ConfigDict, *, data_dir: str | None = None) -> dict:
    """Run the experiment of the module docstring; returns
    ``{"rows": {name: {"bpb", "gain_fraction", "teacher_available", "step_time_ratio"}},
    "teachers": {domain: {"vocab_size", "bpb"}}}``.

    Args:
      cfg: `lm_xtok_config()` (or `quick_lm_xtok` of it); `cfg.domains` may hold built-in
        names or `TextDomain`s.
      data_dir: where the domains and tokenized data are cached (default: the TFDS data dir).
    """
    if len(cfg.teacher_vocab_sizes) != len(cfg.domains):
        raise ValueError(f"`teacher_vocab_sizes` needs one size per domain ({len(cfg.domains)}"
                         f"), got {tuple(cfg.teacher_vocab_sizes)}.")
    seq_len = cfg.seq_len
    teacher_len = cfg.teacher_len or 2 * seq_len
    common = dict(seq_len=seq_len, seed=cfg.seed, data_dir=data_dir,
                  max_documents=cfg.max_documents or None)
    mix = prepare_lm_data(list(cfg.domains), vocab_size=cfg.student_vocab_size, **common)
    student_tok = mix.tokenizer
    domains = list(cfg.domains)

    def train_teacher(k, tokenizer, vocab):
        data = prepare_lm_data([domains[k]], tokenizer=tokenizer, vocab_size=vocab, **common)
        fns, params = _model(cfg.teachers, data.tokenizer.vocab_size, teacher_len, 100 + k)
        tx = optax.adam(cfg.teachers.learning_rate)
        step = jax.jit(make_supervised_step(fns.logits, tx))
        state, _, _ = _train(step, init_train_state(params, tx),
                             _fields(data.packed[data.domains[0]]["train"]),
                             steps=cfg.teachers.steps, batch_size=cfg.teachers.batch_size,
                             seed=cfg.seed + k)
        test = data.packed[data.domains[0]]["test"]
        bpb = _bits_per_byte(_nll(fns.logits), state.params, test, rows=cfg.test_rows,
                             batch_size=cfg.eval_batch_size)
        return data.tokenizer, fns, state.params, bpb

    own = [train_teacher(k, None, v) for k, v in enumerate(cfg.teacher_vocab_sizes)]
    teachers_report = {mix.domains[k]: {"vocab_size": tok.vocab_size, "bpb": bpb}
                       for k, (tok, _, _, bpb) in enumerate(own)}
    shared = ([train_teacher(k, student_tok, None) for k in range(len(domains))]
              if cfg.same_tokenizer else None)

    # The transfer set: the mixture's training documents (a fixed sample), aligned.
    rng = np.random.default_rng(cfg.seed)
    # The domains as prepared above (names or the user's TextDomains, `take`n alike).
    from mtkd_jax.data.corpora import TextDomain, load_domain

    loaded = [d if isinstance(d, TextDomain) else load_domain(d, data_dir=data_dir)
              for d in domains]
    if cfg.max_documents:
        loaded = [d.take(cfg.max_documents) for d in loaded]
    texts = [t for d in loaded for t in d["train"]]
    order = rng.permutation(len(texts))[: cfg.student.transfer_docs or None]
    texts = [texts[i] for i in order]

    test = mix.mixture("test")[0]
    fns, params0 = _model(cfg.student, student_tok.vocab_size, seq_len, cfg.seed)
    tx = optax.adam(cfg.student.learning_rate)
    student_nll = _nll(fns.logits)

    def evaluate(params):
        return _bits_per_byte(student_nll, params, test, rows=cfg.test_rows,
                              batch_size=cfg.eval_batch_size)

    rows, times = {}, {}
    alone_rows = pack_aligned(texts, student_tok, [], seq_len=seq_len, teacher_len=1)
    alone_rows = {k: v for k, v in alone_rows.items() if not k.startswith("teacher_")}
    step = jax.jit(make_supervised_step(fns.logits, tx))
    state, _, _ = _train(step, init_train_state(params0, tx), alone_rows,
                         steps=cfg.student.steps, batch_size=cfg.student.batch_size,
                         seed=cfg.seed)
    rows["alone"] = {"bpb": evaluate(state.params)}

    def distill_row(name, teachers, method):
        toks, t_fns, t_params = zip(*[(t[0], t[1], t[2]) for t in teachers], strict=True)
        aligned = pack_aligned(texts, student_tok, list(toks), seq_len=seq_len,
                               teacher_len=teacher_len)
        projections = [build_projection(t, student_tok) for t in toks]
        fn = make_aligned_teachers([f.logits for f in t_fns], projections, method=method,
                                   uld_size=cfg.uld_size)
        distill = make_distill_step(fns.features, None, tx, student_head=fns.head,
                                    chunk_size=cfg.chunk_size, weighting=cfg.weighting,
                                    alpha=cfg.alpha, temperature=cfg.temperature,
                                    student_unmatched=student_unmatched(projections),
                                    uld_weight=cfg.uld_weight)

        @jax.jit
        def step(state, batch, key):
            return distill(state, {**batch, **fn(t_params, batch)}, key)

        state, metrics, seconds = _train(step, init_train_state(params0, tx), aligned,
                                         steps=cfg.student.steps,
                                         batch_size=cfg.student.batch_size, seed=cfg.seed)
        times[name] = seconds
        m = aligned["mask"]
        rows[name] = {"bpb": evaluate(state.params),
                      "teacher_available": ((aligned["teacher_available"] * m).sum((1, 2))
                                            / m.sum()).tolist()}

    if shared is not None:
        distill_row("shared", shared, "prefix")
    for method in cfg.methods:
        distill_row(f"xtok-{method}", own, method)
    base = rows["alone"]["bpb"]
    for name, row in rows.items():
        if "shared" in rows and name != "alone":
            gain = base - rows["shared"]["bpb"]
            # Only meaningful when the shared teachers help (NaN otherwise: a ratio of two
            # losses would read as a fraction of a gain).
            row["gain_fraction"] = (base - row["bpb"]) / gain if gain > 0 else float("nan")
        if "shared" in times and name in times:
            row["step_time_ratio"] = times[name] / times["shared"]
    return {"rows": rows, "teachers": teachers_report}
