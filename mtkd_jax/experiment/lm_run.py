"""What the language-model experiments share: a run folder, training, evaluation.

`mtkd lm` (`mtkd_jax.experiment.lm`: one tokenizer for every model) and its setting with
teachers that have their own tokenizers (`mtkd_jax.experiment.lm_xtok`) run on the same
machinery, written once here: `LMRun` (the run folder: finished rows kept in ``rows/`` and
read back by a rerun, per-stage times, the whole-run progress bar), `train_model` (`fit`
with checkpoints under the run folder, so a rerun resumes a training, TensorBoard and the
validation curve), `train_teacher` (one domain teacher), the packed-row batches and the test
metrics per domain and on the mixture (perplexity, bits per byte, token accuracy, agreement).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtkd_jax.data import PackedSplit
from mtkd_jax.data.packing import batches as packed_batches
from mtkd_jax.experiment import summaries
from mtkd_jax.experiment.config import ConfigError
from mtkd_jax.experiment.progress import RunProgress, StageTimes, log
from mtkd_jax.metrics import compute_token_metrics, merge_stats, token_stats
from mtkd_jax.models.transformer import Transformer, preset
from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.training import fit as loop
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_supervised_step

__all__ = ["LN2", "METRICS", "MIX", "LMModels", "LMRun", "eval_batches", "eval_student",
           "first_rows", "flatten", "mixture_metrics", "model_batch", "nll_eval", "optimizer",
           "select_rows", "slug", "student_test_step", "train_model", "train_teacher",
           "with_bpb", "RESUMABLE_KEYS", "run_setting", "online_teachers"]

METRICS = ("perplexity", "bpb", "accuracy", "agreement")
MIX = "mixture"
LN2 = math.log(2.0)


def model_batch(b: dict) -> dict:
    """Packed rows -> the batch the steps take: the model reads tokens, segment ids and
    positions (documents packed in a row do not see each other)."""
    out = {"x": {"tokens": b["x"], "segment_ids": b["segment_ids"],
                 "positions": b["positions"]},
           "y": b["y"], "mask": b["mask"]}
    if "index" in b:
        out["index"] = b["index"]
    return out


def select_rows(split: PackedSplit, idx: np.ndarray) -> PackedSplit:
    """The rows `idx` of a split, in memory, with their token and byte counts."""
    idx = np.sort(np.asarray(idx))
    fields = {f.name: np.asarray(getattr(split, f.name)[idx])
              for f in dataclasses.fields(PackedSplit)
              if f.name not in ("num_tokens", "num_bytes", "num_docs")}
    return PackedSplit(**fields, num_tokens=int(fields["mask"].sum()),
                       num_bytes=int(fields["row_bytes"].sum()), num_docs=0)


def first_rows(split: PackedSplit, limit: int) -> PackedSplit:
    return select_rows(split, np.arange(min(len(split), limit)))


def eval_batches(split: PackedSplit, batch_size: int):
    return [model_batch(b) for b in packed_batches(
        split, batch_size=min(batch_size, len(split)), shuffle=False, drop_remainder=False)]


class LMModels:
    """Each transformer's pure functions and jitted steps, built once per run (one per
    vocabulary: teachers with their own tokenizers get one each); `max_len` the rows' length
    (default `cfg.data.seq_len`)."""

    def __init__(self, cfg, vocab_size: int, *, max_len: int | None = None):
        self.cfg, self.vocab_size = cfg, vocab_size
        self.max_len = max_len or cfg.data.seq_len
        self._cache: dict = {}

    def config(self, which: str):
        spec = self.cfg.teachers if which == "teacher" else self.cfg.student
        return preset(spec.size, vocab_size=self.vocab_size, max_len=self.max_len,
                      **spec.model_kwargs.to_dict())

    def init(self, which: str, seed: int):
        """(fns, params) of a fresh model; fns shared by every model of the same kind."""
        fns, params = token_model_fns(Transformer(self.config(which), rngs=nnx.Rngs(seed)))
        return self._cache.setdefault(("fns", which), fns), params

    def cached(self, key, build: Callable):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def online_teachers(fns) -> tuple[Callable, Callable]:
    """`(teacher_apply, teacher_head)` of K teachers of one family for the chunked distill
    step (`make_distill_step(..., teacher_head=)`): their features `[K, B, L, H_t]`, and per
    chunk their output heads `[K, B, c, H_t] -> [K, B, c, V]`, so that the teachers' logits
    are never held whole as `[K, B, L, V]` (faster: benchmarks/lm.py, `lib_online` against
    `lib_online_stacked`). Same numbers as the stacked logits (the same products, row by
    row)."""
    def apply(tps, x):
        return jnp.stack([fns.features(p, x) for p in tps])

    def head(tps, f):
        return jnp.stack([fns.head(p, f[k]) for k, p in enumerate(tps)])

    return apply, head


def optimizer(spec, total_steps: int):
    """AdamW, linear warmup then cosine decay over the training."""
    warmup = max(1, min(spec.warmup_steps, total_steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, warmup, max(total_steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=spec.weight_decay))


def slug(name: str) -> str:
    """A row or model name as a file name: `seed 0: 3 teachers: uniform` ->
    `seed_0_3_teachers_uniform`."""
    return name.replace(" ", "_").replace(":", "").replace("(", "").replace(")", "")


def train_model(run, name: str, state, step, batches_fn, *, steps: int, steps_per_epoch: int,
           eval_fn, seed: int):
    """`fit` for one model: checkpoints and TensorBoard under the run folder."""
    cfg = run.cfg
    # Whole epochs of equal length, `steps` updates in all (up to epochs - 1 more): a split
    # shorter than `steps` batches is seen several times, not rounded up to whole epochs.
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    per_epoch = math.ceil(steps / epochs)
    total = epochs * per_epoch
    folder = slug(name)
    writer = summaries.make_writer(os.path.join(run.out, "tensorboard", folder))
    run.progress.start(name)
    try:
        result = loop.fit(
            state, step, batches_fn, num_epochs=epochs, steps_per_epoch=per_epoch,
            key=jax.random.key(seed), eval_fn=eval_fn,
            eval_every=max(1, total // max(cfg.evals_per_training, 1)),
            checkpoint_dir=(os.path.join(run.out, "checkpoints", folder)
                            if cfg.checkpoints else None),
            save_every=max(1, min(total, cfg.save_every)), best_metric="nll",
            best_mode="min", progress=cfg.progress,
            log_fn=summaries.log_fn(writer, every=cfg.log_every))
    finally:
        writer.close()
    run.progress.finished()
    if result.resumed_from is not None:
        log(f"{name}: restored its checkpoint at update {result.resumed_from} of {total}")
    curve = [(r["step"], float(r["nll"])) for r in result.history["eval"]]
    return result.state, curve


def nll_eval(run, eval_step: Callable, split: PackedSplit) -> Callable:
    """`eval_fn(state)`: mean NLL per valid token of `split` (validation rows), by the
    library's eval step (`make_eval_step(logits_fn, None)`, built once per model kind)."""
    batches = eval_batches(split, run.cfg.eval_batch_size)
    return lambda state: {"nll": evaluate(eval_step, state.params, batches)["student"]["nll"]}


def with_bpb(m: dict, split: PackedSplit) -> dict:
    out = {k: float(m[k]) for k in ("perplexity", "accuracy", "agreement", "nll") if k in m}
    out["bpb"] = out["nll"] * split.num_tokens / (split.num_bytes * LN2)
    out["tokens"] = float(split.num_tokens)
    out["bytes"] = float(split.num_bytes)
    return out


def mixture_metrics(per_domain: dict[str, dict]) -> dict:
    """Per-domain metrics -> the mixture's (token-weighted; bits over all bytes)."""
    tokens = sum(m["tokens"] for m in per_domain.values())
    nll = sum(m["nll"] * m["tokens"] for m in per_domain.values()) / tokens
    out = {"nll": nll, "perplexity": math.exp(nll), "tokens": tokens,
           "bytes": sum(m["bytes"] for m in per_domain.values())}
    out["bpb"] = nll * tokens / (out["bytes"] * LN2)
    for k in ("accuracy", "agreement"):
        if all(k in m for m in per_domain.values()):
            out[k] = sum(m[k] * m["tokens"] for m in per_domain.values()) / tokens
    return out


def flatten(row: dict[str, dict]) -> dict[str, float]:
    """`{domain: {metric}}` -> `{metric: mixture value, "<domain>/<metric>": value}`."""
    flat = {k: row[MIX][k] for k in METRICS if k in row[MIX]}
    for d, m in row.items():
        if d != MIX:
            flat.update({f"{d}/{k}": m[k] for k in METRICS if k in m})
    return flat


RESUMABLE_KEYS = ("output_dir", "progress", "seeds", "weightings", "online_weightings",
                  "checkpoints", "save_every", "log_every")
"""Config keys a rerun in the same run folder may change: they add rows or seeds, or change
no number of a finished row (`own_tokenizers.methods` too)."""


_ADDED = {"cache_tail_samples": lambda found: 0,
          "best_teacher_alpha": lambda found: found.get("alpha")}
"""Setting keys added after run folders were written -> the value a folder without them had
(from its other keys): such a folder resumes under that value."""


_REMOVED = ("online_weighting",)
"""Setting keys of older run folders that no longer change a finished row (the one online
weighting is now `online_weightings`, which only adds rows)."""


def _setting_value(found: dict, key: str):
    """`found[key]`, or for a key added since the folder was written the value it had."""
    if key in found:
        return found[key]
    return _ADDED[key](found) if key in _ADDED else None


def run_setting(cfg) -> dict:
    """The config values a run folder's finished rows depend on (`setting.json`): every key
    but `RESUMABLE_KEYS`, flattened to dotted names (`teachers.steps`); the
    own-tokenizer block only when `tokenizers` is ``"own"``."""
    flat: dict = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                walk(name + ".", value)
            else:
                flat[name] = list(value) if isinstance(value, tuple) else value

    walk("", {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_KEYS})
    flat.pop("own_tokenizers.methods", None)
    if cfg.tokenizers != "own":
        flat = {k: v for k, v in flat.items() if not k.startswith("own_tokenizers.")}
    return flat


class LMRun:
    """A run folder: `cfg`, the folder `out`, finished results in ``rows/`` (`saved`,
    `save`: a rerun reads them instead of training again), the `StageTimes` and the
    whole-run `RunProgress`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = os.path.abspath(cfg.output_dir)
        os.makedirs(os.path.join(self.out, "rows"), exist_ok=True)
        # One setting per folder: finished rows and checkpoints are found by name, so a rerun
        # with any setting that changes results (a cache's k, a model size, the data) must
        # not pick them up. Only what adds rows or changes no number may differ.
        marker = os.path.join(self.out, "setting.json")
        setting = run_setting(cfg)
        if os.path.exists(marker):
            with open(marker) as f:
                found = json.load(f)
            found = {k: v for k, v in found.items() if k not in _REMOVED}
            if set(found) == {"tokenizers"}:  # a folder from before the whole setting was kept
                setting_of_old = {"tokenizers": setting["tokenizers"]}
                differ = [] if found == setting_of_old else ["tokenizers"]
            else:
                differ = sorted(k for k in set(found) | set(setting)
                                if _setting_value(found, k) != setting.get(k))
            if differ:
                shown = ", ".join(f"{k}={_setting_value(found, k)!r} (now {setting.get(k)!r})"
                                  for k in differ)
                raise ConfigError(
                    f"`config.output_dir` {self.out} holds a run with another setting: "
                    f"{shown}. Its finished rows and checkpoints belong to that setting: "
                    "choose another --config.output_dir.")
        with open(marker + ".tmp", "w") as f:
            json.dump(setting, f, indent=1, sort_keys=True)
        os.replace(marker + ".tmp", marker)
        self.times = StageTimes()
        self.progress = RunProgress(0, enabled=False)

    def row_path(self, name: str) -> str:
        return os.path.join(self.out, "rows", slug(name) + ".json")

    def saved(self, name: str):
        path = self.row_path(name)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return None

    def save(self, name: str, value) -> None:
        tmp = self.row_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(value, f)
        os.replace(tmp, self.row_path(name))


def student_test_step(logits_fn: Callable, vocab_size: int) -> Callable:
    """Jitted `(params, batch) -> TokenStats` of a student on a test batch; agreement
    measured against the ensemble's predictions where the batch holds them
    (``"ensemble_pred"`` `[B, L]`, stored by `mtkd lm`'s teacher pass)."""
    def step(params, batch):
        z = logits_fn(params, batch["x"])
        ref = (jax.nn.one_hot(batch["ensemble_pred"], vocab_size, dtype=jnp.float32)
               if "ensemble_pred" in batch else None)
        return token_stats(z, batch["y"], reference_probs=ref, mask=batch["mask"])
    return jax.jit(step)


def eval_student(step, params, test_sets) -> dict:
    """Test metrics per domain and on the mixture."""
    per = {}
    for d, (split, batches) in test_sets.items():
        total = functools.reduce(merge_stats, (step(params, b) for b in batches))
        per[d] = with_bpb(compute_token_metrics(total), split)
    per[MIX] = mixture_metrics(per)
    return per


def train_teacher(run: LMRun, models: LMModels, name: str, train: PackedSplit,
                  val: PackedSplit, *, seed: int):
    """Train (or restore from the run folder) one teacher on `train` rows, validated on `val`;
    returns `(fns, params, curve)`. Initial weights from `10_000 + seed`, data order from
    `seed`."""
    t = run.cfg.teachers
    fns, p = models.init("teacher", 10_000 + seed)
    tx = optimizer(t, t.steps)
    step = models.cached("teacher step", lambda: jax.jit(make_supervised_step(fns.logits, tx)))
    eval_step = models.cached("teacher eval", lambda: make_eval_step(fns.logits, None))
    state, curve = train_model(
        run, name, init_train_state(p, tx), step,
        lambda e, s: (model_batch(b) for b in packed_batches(
            train, batch_size=t.batch_size, seed=0, epoch=e, start=s)),
        steps=t.steps, steps_per_epoch=len(train) // t.batch_size,
        eval_fn=nll_eval(run, eval_step, val), seed=seed)
    return fns, state.params, curve
