"""The article's pipeline end to end, repeated over seeds, and the comparison it yields.

Per seed (`run_seed`), following the article's sections 2, 3 and 5:

1. train K teachers of one architecture at once (one vmapped program, different initial
   parameters and optionally different learning rates);
2. their predictions on the validation set;
3. the pairwise divergence matrix of those predictions, per kind;
4. the distillation targets of every strategy on the validation set (mean,
   performance-weighted, confidence, entropy, agreement, leave-one-out) and how good each is;
5. a smaller student distilled with each strategy (and trained alone, and from the best single
   teacher), on the labeled train split plus an optional transfer set of unlabeled inputs
   that only the teachers label; and the article's worked variant, codistillation of the K
   teachers toward each other;
6. evaluation on the test set: accuracy, macro recall, macro F1 (the article's), NLL, ECE and
   agreement with the teacher ensemble, for every student, teacher and the ensemble.

`run` repeats this over `config.seeds` seeds, measures the compression (parameters, FLOPs,
latency), and writes the run folder (see `mtkd_jax.experiment.report.write_report`).

Every train loop is `mtkd_jax.loop.fit` (progress bar, checkpoints, resume) over a step from
`mtkd_jax.train` / `mtkd_jax.teachers` compiled data-parallel over all devices
(`mtkd_jax.parallel.data_parallel_step`). Students read the teachers' logits from a cache
computed once per seed, so the teachers run once per example instead of once per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtkd_jax import data as data_lib
from mtkd_jax import models, parallel
from mtkd_jax import teachers as teachers_lib
from mtkd_jax.checkpoint import params_fingerprint
from mtkd_jax.divergence import pairwise_divergence, softmax_t
from mtkd_jax.experiment import summaries
from mtkd_jax.experiment.config import Strategy, parse_strategy, validate_config
from mtkd_jax.loop import fit
from mtkd_jax.metrics import batch_stats, compute_metrics
from mtkd_jax.targets import leave_one_out_targets
from mtkd_jax.train import (
    TrainState,
    distill_targets,
    init_stacked_train_state,
    init_train_state,
    make_codistill_step,
    make_distill_step,
    make_supervised_step,
)
from mtkd_jax.weighting import get_weighting

__all__ = [
    "METRICS",
    "SeedResult",
    "ExperimentResult",
    "analyse_teachers",
    "evaluate_logits",
    "prepare_run_dir",
    "target_name",
    "run_seed",
    "run",
]

METRICS = ("accuracy", "recall", "f1", "precision", "nll", "ece", "agreement")
"""Test metrics of every row (macro recall, F1 and precision; agreement with the ensemble)."""

_EVALS_PER_RUN = 5  # validation points per training run: learning curves, best checkpoint
_INFER_CHUNK = 4096  # examples per teacher inference call when filling the logit cache
_IGNORED_KEYS = ("progress", "log_every")  # may change between a run and its resume


@dataclasses.dataclass
class SeedResult:
    """Everything one seed of the pipeline measured.

    Attributes:
      seed: the seed.
      rows: row name -> test metrics (`METRICS` and `n`, Python floats). Rows are
        ``teacher_<k>``, ``teachers (mean)`` (their mean), ``ensemble``, each strategy's
        name, ``<name> (no transfer)`` for `config.distill.train_only`, and
        ``codistill (each)`` (mean over the K codistilled teachers) / ``codistill
        (ensemble)``.
      teacher_val_accuracy: `[K]` validation accuracies (the performance weights' scores).
      divergence: kind -> `[K, K]` mean pairwise divergence of the teachers' validation
        predictions (T = 1).
      targets: target (see `target_name`) -> quality of the fused target on the validation
        set: accuracy, NLL and ECE of the target as a prediction, mean entropy, mean largest
        teacher weight; and ``leave_one_out[k]``, the target of teacher k in codistillation.
      weights: target -> `[K, N_val]` per-example teacher weights at the distillation
        temperature.
      histories: model name -> `fit` history (`{"train": [...], "eval": [...]}`).
      steps: model name -> number of updates it was trained for.
      seconds: phase -> wall-clock seconds.
    """

    seed: int
    rows: dict[str, dict[str, float]]
    teacher_val_accuracy: list[float]
    divergence: dict[str, list[list[float]]]
    targets: dict[str, dict[str, float]]
    weights: dict[str, np.ndarray]
    histories: dict[str, dict]
    steps: dict[str, int]
    seconds: dict[str, float]


@dataclasses.dataclass
class ExperimentResult:
    """What `run` returns: the per-seed results, the compression rows and the run folder."""

    config: ml_collections.ConfigDict
    run_dir: str
    seeds: list[SeedResult]
    compression: list[dict[str, Any]]
    environment: dict[str, Any]
    wall_seconds: float
    files: list[str]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


@jax.jit
def _metric_values(logits, labels, reference_probs):
    return compute_metrics(batch_stats(logits, labels, reference_probs=reference_probs))


def evaluate_logits(
    logits: jax.Array, labels: jax.Array, reference_probs: jax.Array | None = None
) -> dict[str, float]:
    """Test metrics of one model's logits as Python floats (see `METRICS`).

    Args:
      logits: `[N, C]` logits (or log-probabilities).
      labels: `[N]` int labels.
      reference_probs: `[N, C]` distribution to measure agreement with (the teacher
        ensemble); agreement is NaN without it.

    Returns:
      `{"accuracy", "precision", "recall", "f1", "nll", "ece", "agreement", "n"}`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.experiment.pipeline import evaluate_logits
      >>> m = evaluate_logits(jnp.array([[2.0, 0.0], [0.0, 2.0]]), jnp.array([0, 0]),
      ...                     jnp.array([[0.9, 0.1], [0.9, 0.1]]))
      >>> m["accuracy"], m["agreement"], m["n"]
      (0.5, 0.5, 2.0)
    """
    ref = jnp.exp(jax.nn.log_softmax(logits)) if reference_probs is None else reference_probs
    values = jax.device_get(_metric_values(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(labels, jnp.int32),
                                           jnp.asarray(ref, jnp.float32)))
    out = {k: float(v) for k, v in values.items()}
    if reference_probs is None:
        out["agreement"] = float("nan")
    return out


def _predict(apply_fn: Callable, params, x: np.ndarray) -> np.ndarray:
    """Logits of a jitted apply over `x` in chunks: `[..., N, C]` numpy."""
    outs = [np.asarray(apply_fn(params, x[i:i + _INFER_CHUNK]))
            for i in range(0, len(x), _INFER_CHUNK)]
    return np.concatenate(outs, axis=-2)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probs, np.finfo(np.float32).tiny))


def _softmax_np(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def _optimizer(learning_rate: float, total_steps: int, weight_decay: float):
    # AdamW with a cosine decay: no tuning of a schedule per row, the same for every student.
    return optax.adamw(optax.cosine_decay_schedule(learning_rate, max(total_steps, 1)),
                       weight_decay=weight_decay)


def _model_kwargs(section) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in section.model_kwargs.to_dict().items()}


def _to_global(batch: dict, mesh) -> dict:
    """This host's slice of a global batch -> what the data-parallel step takes."""
    if jax.process_count() == 1:
        return batch  # data_parallel_step splits host arrays over the local devices itself
    return parallel.global_batch_from_local(batch, mesh)


def _evals(total: int) -> int:
    return max(1, math.ceil(total / _EVALS_PER_RUN))


class _Context:
    """What every phase of one seed needs: config, data, devices, output paths, and the
    models and compiled steps shared by all seeds."""

    def __init__(self, config, dataset, transfer_x, mesh, run_dir, seed, shared: dict):
        self.config, self.ds, self.transfer_x = config, dataset, transfer_x
        self.mesh, self.run_dir, self.seed = mesh, run_dir, seed
        self.shared = shared
        self.key = jax.random.key(seed)
        self.num_classes = dataset.info.num_classes
        self.val_x = jnp.asarray(dataset.validation.x)
        self.val_y = jnp.asarray(dataset.validation.y)

    def cached(self, key, build: Callable):
        """`build()` once per run for `key`: the same apply function and step objects in
        every seed, so JAX compiles them once (its caches are keyed by function identity)."""
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    def model(self, name: str, kwargs: dict[str, Any]) -> tuple[Any, Callable]:
        """(Linen model, apply_fn) of a model name and its kwargs, one per run."""

        def build():
            model = models.make_model(name, num_classes=self.num_classes, **kwargs)
            return model, models.apply_fn_of(model)

        return self.cached(("model", name, json.dumps(kwargs, sort_keys=True)), build)

    def parallel(self, key, build_step: Callable):
        """(tx, data-parallel step) from `build_step() -> (tx, step)`, one per run and key."""

        def build():
            tx, step = build_step()
            return tx, parallel.data_parallel_step(step, self.mesh)

        return self.cached(("step", *key), build)

    def checkpoint_dir(self, name: str) -> str | None:
        if not self.config.checkpoints:
            return None
        return os.path.join(self.run_dir, "checkpoints", f"seed{self.seed}", _slug(name))

    def log_fn(self, name: str):
        if not self.config.tensorboard or jax.process_index() != 0:
            return None, None
        writer = summaries.make_writer(
            os.path.join(self.run_dir, "tensorboard", f"seed{self.seed}", _slug(name))
        )
        return writer, summaries.log_fn(writer, every=self.config.log_every)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def _fit(ctx: _Context, name: str, state, step, batches_fn, *, steps_per_epoch, epochs,
         eval_fn, fingerprint=None):
    total = steps_per_epoch * epochs
    _log(f"[seed {ctx.seed}] {name}: {epochs} epochs x {steps_per_epoch} steps = {total} updates")
    writer, log_fn = ctx.log_fn(name)
    try:
        result = fit(
            state,
            step,
            batches_fn,
            num_epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            key=jax.random.fold_in(ctx.key, zlib.crc32(name.encode()) % (2**31)),
            eval_fn=eval_fn,
            eval_every=_evals(total),
            checkpoint_dir=ctx.checkpoint_dir(name),
            save_every=total,
            best_metric="accuracy",
            fingerprint=fingerprint,
            progress=ctx.config.progress,
            log_fn=log_fn,
        )
    finally:
        if writer is not None:
            writer.close()
    return result


# ---------------------------------------------------------------------------------------------
# 1. Teachers


def _ensemble_fit_step(ensemble_step: Callable) -> Callable:
    """`fit` wants a scalar step counter; the stacked teachers keep one per teacher."""

    def step(state: TrainState, batch: dict, key: jax.Array):
        k = jax.tree.leaves(state.params)[0].shape[0]
        stacked = teachers_lib.TeacherState(
            jnp.broadcast_to(state.step, (k,)), state.params, state.opt_state
        )
        stacked, metrics = ensemble_step(stacked, batch, key)
        return TrainState(state.step + 1, stacked.params, stacked.opt_state), metrics

    return step


class Teachers(NamedTuple):
    """The trained teachers of one seed.

    Attributes:
      params: stacked params (leaves `[K, ...]`, one architecture) or a tuple of K params.
      apply: frozen `apply(params, x [B, ...]) -> logits [K, B, C]`.
      members: K `(apply_fn, params)` pairs, one per teacher.
      labels: K model names, e.g. ``("cnn1d", "cnn1d", "cnn1d")``.
      histories: fit histories, ``{"teachers": ...}`` for stacked training or
        ``{"teacher_k": ...}`` for one-after-another training.
      steps: updates each teacher got.
    """

    params: Any
    apply: Callable
    members: list
    labels: tuple
    histories: dict
    steps: int


def _teacher_models(ctx: _Context) -> list[tuple[str, Any, Callable]]:
    """(name, model, apply) per teacher: K of `teachers.model`, or `teachers.models`."""
    cfg = ctx.config.teachers
    names = tuple(cfg.models) or (cfg.model,) * cfg.num
    out = []
    for name in names:
        # Another architecture than `teachers.model` gets its own defaults.
        model, apply_fn = ctx.model(name, _model_kwargs(cfg) if name == cfg.model else {})
        out.append((name, model, apply_fn))
    return out


def train_teachers(ctx: _Context) -> Teachers:
    """Train the K teachers: one vmapped program for one architecture, else one by one."""
    cfg = ctx.config.teachers
    train = ctx.ds.train
    spe = data_lib.num_batches(train, batch_size=cfg.batch_size)
    total = spe * cfg.epochs

    def make_tx(learning_rate):
        return _optimizer(learning_rate, total, cfg.weight_decay)

    def teacher_tx():
        # Learning rate injected: one per teacher when `teachers.learning_rates` is set.
        return optax.inject_hyperparams(make_tx)(learning_rate=cfg.learning_rate)

    def build_stacked(apply_fn):
        tx = teacher_tx()
        return tx, _ensemble_fit_step(teachers_lib.make_ensemble_train_step(apply_fn, tx))

    def build_single(apply_fn):
        tx = teacher_tx()
        return tx, teachers_lib.make_teacher_train_step(apply_fn, tx)

    example = jnp.asarray(train.x[:1])
    keys = jax.random.split(jax.random.fold_in(ctx.key, 1), cfg.num)
    lrs = tuple(cfg.learning_rates)

    def batches_fn(epoch, start):
        for b in data_lib.batches(train, batch_size=cfg.batch_size, seed=ctx.seed, epoch=epoch,
                                  start=start):
            yield _to_global({"x": b["x"], "y": b["y"]}, ctx.mesh)

    specs = _teacher_models(ctx)
    labels = tuple(name for name, _, _ in specs)
    if len(set(labels)) == 1:
        _, model, apply_fn = specs[0]
        hyper = {"learning_rate": jnp.asarray(lrs, jnp.float32)} if lrs else None
        tx, step = ctx.parallel(("teachers", apply_fn, total), lambda: build_stacked(apply_fn))
        stacked = teachers_lib.init_ensemble(
            lambda key: models.init_params(model, key, example), keys, tx, hyperparams=hyper
        )
        state = TrainState(jnp.zeros((), jnp.int32), stacked.params, stacked.opt_state)
        infer = ctx.cached(("vmapped", apply_fn), lambda: jax.jit(jax.vmap(apply_fn, (0, None))))

        def eval_fn(state):
            z = infer(state.params, ctx.val_x)
            acc = jnp.mean(jnp.argmax(z, -1) == ctx.val_y[None], axis=-1)
            return {"accuracy": jnp.mean(acc), "accuracy_per_teacher": acc}

        result = _fit(ctx, "teachers", state, step, batches_fn, steps_per_epoch=spe,
                      epochs=cfg.epochs, eval_fn=eval_fn)
        params = result.state.params
        members = [(apply_fn, jax.tree.map(lambda a, i=i: a[i], params))
                   for i in range(cfg.num)]
        stacked_apply = ctx.cached(("stacked", apply_fn), lambda: teachers_lib.make_stacked_apply(
            apply_fn, strategy="vmap"))
        return Teachers(params, stacked_apply, members, labels, {"teachers": result.history},
                        result.step)

    # Mixed architectures: the same loop, one teacher after another.
    members, histories = [], {}
    for i, (_, model, apply_fn) in enumerate(specs):
        tx, step = ctx.parallel(("teacher", apply_fn, total),
                                lambda apply_fn=apply_fn: build_single(apply_fn))
        state = teachers_lib.init_teacher_state(models.init_params(model, keys[i], example), tx)
        if lrs:
            state = teachers_lib.set_hyperparams(state, {"learning_rate": lrs[i]})
        result = _fit(ctx, f"teacher_{i}", state, step, batches_fn, steps_per_epoch=spe,
                      epochs=cfg.epochs, eval_fn=_accuracy_eval(ctx, apply_fn))
        members.append((apply_fn, result.state.params))
        histories[f"teacher_{i}"] = result.history
    params = tuple(p for _, p in members)
    apply = ctx.cached(("heterogeneous", labels), lambda: teachers_lib.make_heterogeneous_apply(
        [a for a, _ in members], names=labels))
    return Teachers(params, apply, members, labels, histories, spe * cfg.epochs)


# ---------------------------------------------------------------------------------------------
# 2-4. Predictions, divergences and targets on the validation set


# Jitted once each: run eagerly, every primitive would be compiled on its own.
_targets = jax.jit(distill_targets, static_argnames=("temperature", "weighting"))
_mean_divergence = jax.jit(lambda probs, kind: jnp.mean(pairwise_divergence(probs, kind=kind), 0),
                           static_argnames=("kind",))


@jax.jit
def _mean_entropy(probs):
    return -jnp.mean(jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1)),
                                       0.0), axis=-1))


def target_name(strategy: Strategy) -> str:
    """The name of a distillation strategy's target: rows that differ only in their loss
    (``mean`` and ``mean_mse``) share one.

    Example:
      >>> from mtkd_jax.experiment.config import parse_strategy
      >>> from mtkd_jax.experiment.pipeline import target_name
      >>> target_name(parse_strategy("mean_mse")), target_name(parse_strategy("best_teacher"))
      ('mean', 'best_teacher')
    """
    if strategy.teachers == "best":
        return "best_teacher"
    return "mean" if strategy.weighting == "uniform" else strategy.weighting


def analyse_teachers(val_logits: np.ndarray, val_y: np.ndarray, strategies, *, kinds,
                     temperature: float, weightings: dict[str, Callable], best: int):
    """Divergence matrices, target quality and teacher weights on the validation set.

    Args:
      val_logits: `[K, N, C]` teacher logits on the validation set.
      val_y: `[N]` labels.
      strategies: the distillation `Strategy` rows.
      kinds: divergence kinds to compute.
      temperature: the distillation temperature (weights are those the student gets).
      weightings: strategy name -> weighting function.
      best: index of the best teacher (by validation accuracy).

    Returns:
      `(divergence {kind: [K, K]}, targets {target: {...}}, weights {target: [K, N]})`, the
      last two keyed by `target_name`; leave-one-out targets as ``leave_one_out[k]``.
    """
    z = jnp.asarray(val_logits)
    y = jnp.asarray(val_y)
    k = z.shape[0]
    probs = softmax_t(z)  # the article's predictions, T = 1
    divergence = {kind: np.asarray(_mean_divergence(probs, kind=kind)).tolist()
                  for kind in kinds}
    targets, weights = {}, {}
    for s in strategies:
        name = target_name(s)
        if s.kind != "distill" or name in targets:
            continue
        if s.teachers == "best":
            fused = probs[best]
            w = np.zeros((k, z.shape[1]), np.float32)
            w[best] = 1.0
        else:
            fn = weightings[s.name]
            fused = _targets(z, y, temperature=1.0, weighting=fn).targets
            w = np.asarray(_targets(z, y, temperature=temperature, weighting=fn).weights)
        weights[name] = w
        m = evaluate_logits(_log_probs(np.asarray(fused)), y)
        targets[name] = {
            "accuracy": m["accuracy"],
            "nll": m["nll"],
            "ece": m["ece"],
            "entropy": float(_mean_entropy(fused)),
            "max_weight": float(np.mean(np.max(w, axis=0))),
        }
    if k >= 2:
        loo = leave_one_out_targets(probs)  # [K, N, C]
        for i in range(k):
            m = evaluate_logits(_log_probs(np.asarray(loo[i])), y)
            targets[f"leave_one_out[{i}]"] = {
                "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                "entropy": float("nan"), "max_weight": float("nan"),
            }
    return divergence, targets, weights


# ---------------------------------------------------------------------------------------------
# 5. Students and codistillation


def _distill_split(ctx: _Context, use_transfer: bool):
    """The split a student learns from: train (+ transfer inputs with placeholder labels)."""
    train = ctx.ds.train
    if not use_transfer or ctx.transfer_x is None:
        return train, len(train)
    n = len(ctx.transfer_x)
    split = data_lib.Split(
        "train+transfer",
        np.concatenate([train.x, ctx.transfer_x]),
        np.concatenate([train.y, np.zeros(n, np.int32)]),
    )
    return split, len(train)


def _student_batches(ctx, split, n_labeled, cache, batch_size):
    def batches_fn(epoch, start):
        for b in data_lib.batches(split, batch_size=batch_size, seed=ctx.seed, epoch=epoch,
                                  start=start):
            idx = b["index"]
            out = {"x": b["x"], "y": b["y"]}
            if n_labeled < len(split):
                out["label_mask"] = (idx < n_labeled).astype(np.float32)
            if cache is not None:
                out["teacher_logits"] = cache[:, idx]
            yield _to_global(out, ctx.mesh)

    return batches_fn


def _accuracy_eval(ctx: _Context, apply_fn: Callable) -> Callable:
    infer = ctx.cached(("jit", apply_fn), lambda: jax.jit(apply_fn))

    def eval_fn(state):
        z = infer(state.params, ctx.val_x)
        logp = jax.nn.log_softmax(z)
        return {
            "accuracy": jnp.mean(jnp.argmax(z, -1) == ctx.val_y),
            "nll": -jnp.mean(jnp.take_along_axis(logp, ctx.val_y[:, None], -1)),
        }

    return eval_fn


def train_student(ctx: _Context, name: str, strategy: Strategy, *, cache, split, n_labeled,
                  weighting, fingerprint):
    """Train one student row; return (params, apply_fn, fit result, number of updates)."""
    cfg, dcfg = ctx.config.student, ctx.config.distill
    model, apply_fn = ctx.model(cfg.model, _model_kwargs(cfg))
    spe = data_lib.num_batches(split, batch_size=cfg.batch_size)
    epochs = max(1, round(cfg.steps / spe))
    total = spe * epochs

    def build():
        tx = _optimizer(cfg.learning_rate, total, cfg.weight_decay)
        if strategy.kind == "supervised":
            return tx, make_supervised_step(apply_fn, tx)
        return tx, make_distill_step(
            apply_fn, None, tx, weighting=weighting,
            soft_loss=strategy.soft_loss or dcfg.soft_loss,
            temperature=dcfg.temperature, alpha=dcfg.alpha,
        )

    # Keyed by the weighting object too: the performance weights change with the seed.
    tx, step = ctx.parallel(("student", name, total, weighting), build)
    key = jax.random.fold_in(ctx.key, 2)  # every row starts from the same initial student
    params = models.init_params(model, key, jnp.asarray(split.x[:1]))
    if strategy.kind == "supervised":
        cache = None
    result = _fit(ctx, name, init_train_state(params, tx), step,
                  _student_batches(ctx, split, n_labeled, cache, cfg.batch_size),
                  steps_per_epoch=spe, epochs=epochs, eval_fn=_accuracy_eval(ctx, apply_fn),
                  fingerprint=fingerprint)
    return result.state.params, apply_fn, result, total


def codistill(ctx: _Context, teacher_params, apply_fn, *, split, n_labeled, fingerprint):
    """The article's worked project: the K teachers refine each other (leave-one-out targets)."""
    cfg = ctx.config.codistill
    spe = data_lib.num_batches(split, batch_size=ctx.config.teachers.batch_size)
    total = spe * cfg.epochs

    def build():
        tx = _optimizer(cfg.learning_rate, total, 0.0)
        return tx, make_codistill_step(apply_fn, tx, soft_loss=cfg.soft_loss,
                                       temperature=cfg.temperature, alpha=cfg.alpha)

    tx, step = ctx.parallel(("codistill", apply_fn, total), build)
    state = init_stacked_train_state(jax.tree.map(jnp.array, teacher_params), tx)
    infer = ctx.cached(("vmapped", apply_fn), lambda: jax.jit(jax.vmap(apply_fn, (0, None))))

    def eval_fn(state):
        z = infer(state.params, ctx.val_x)
        acc = jnp.mean(jnp.argmax(z, -1) == ctx.val_y[None], axis=-1)
        return {"accuracy": jnp.mean(acc), "accuracy_per_teacher": acc}

    result = _fit(ctx, "codistill", state, step,
                  _student_batches(ctx, split, n_labeled, None,
                                   ctx.config.teachers.batch_size),
                  steps_per_epoch=spe, epochs=cfg.epochs, eval_fn=eval_fn,
                  fingerprint=fingerprint)
    return result.state.params, result, total


# ---------------------------------------------------------------------------------------------
# One seed


def run_seed(config, seed: int, dataset, transfer_x, mesh, run_dir: str, strategies,
             shared: dict | None = None):
    """Run the whole pipeline once with `seed`; return a `SeedResult` and the trained models.

    Args:
      config: a validated config (`validate_config`).
      seed: seeds the teachers' and the student's initialisation and the data order.
      dataset: the `mtkd_jax.data.Dataset`.
      transfer_x: `[M, ...]` unlabeled transfer inputs, or None.
      mesh: the data-parallel mesh.
      run_dir: the run folder (checkpoints, TensorBoard).
      strategies: the parsed `Strategy` rows.
      shared: a dict kept across the seeds of a run: models and compiled steps built once.

    Returns:
      `(SeedResult, models)` where `models` maps "teacher", "student", "ensemble" to
      `(apply_fn, params)` for the compression measurements.
    """
    ctx = _Context(config, dataset, transfer_x, mesh, run_dir, seed,
                   {} if shared is None else shared)
    seconds: dict[str, float] = {}
    histories: dict[str, dict] = {}
    steps: dict[str, int] = {}
    rows: dict[str, dict[str, float]] = {}

    # 1. Teachers.
    t0 = time.perf_counter()
    trained_teachers = train_teachers(ctx)
    teacher_params, stacked_apply = trained_teachers.params, trained_teachers.apply
    k = config.teachers.num
    names = [f"teacher_{i}" for i in range(k)]
    histories.update(trained_teachers.histories)
    steps["teachers"] = trained_teachers.steps
    fingerprint = params_fingerprint(teacher_params, names=names)
    if config.checkpoints:  # every process: orbax saves are collective across hosts
        teachers_lib.save_teachers(
            os.path.join(run_dir, "checkpoints", f"seed{seed}", "teachers_final"),
            jax.device_get(teacher_params), names=names,
            meta={"models": list(trained_teachers.labels),
                  "model_kwargs": config.teachers.model_kwargs.to_dict(), "seed": seed},
            overwrite=True,
        )
    seconds["teachers"] = time.perf_counter() - t0

    # 2. Predictions on the validation and test sets.
    t0 = time.perf_counter()
    val_logits = _predict(stacked_apply, teacher_params, dataset.validation.x)
    test_logits = _predict(stacked_apply, teacher_params, dataset.test.x)
    val_acc = np.mean(np.argmax(val_logits, -1) == dataset.validation.y[None], axis=-1)
    test_y = dataset.test.y
    ens = np.mean(_softmax_np(test_logits), axis=0)
    for i, name in enumerate(names):
        rows[name] = evaluate_logits(test_logits[i], test_y, ens)
    rows["teachers (mean)"] = {m: float(np.mean([rows[n][m] for n in names]))
                               for m in rows[names[0]]}
    rows["ensemble"] = evaluate_logits(_log_probs(ens), test_y, ens)

    # 3-4. Divergences, weights and targets.
    best = int(np.argmax(val_acc))
    no_transfer = [parse_strategy(n) for n in config.distill.train_only]
    weightings = {}
    for s in [*strategies, *no_transfer]:
        if s.kind != "distill":
            continue
        if s.weighting == "scores":
            weightings[s.name] = get_weighting(
                "scores", scores=jnp.asarray(val_acc, jnp.float32),
                temperature=config.distill.scores_temperature,
            )
        else:
            weightings[s.name] = get_weighting(s.weighting)
    divergence, targets, weights = analyse_teachers(
        val_logits, dataset.validation.y, strategies,
        kinds=tuple(config.analysis.divergence_kinds) if k >= 2 else (),
        temperature=config.distill.temperature, weightings=weightings,
        best=best,
    )
    seconds["analysis"] = time.perf_counter() - t0

    # 5. The logit cache of the distillation split, then every student row.
    t0 = time.perf_counter()
    use_transfer = transfer_x is not None
    split, n_labeled = _distill_split(ctx, use_transfer)
    cache = _predict(stacked_apply, teacher_params, split.x)  # [K, N, C]
    seconds["cache"] = time.perf_counter() - t0

    def row_data(s: Strategy, with_transfer: bool):
        """(split, labeled count, teacher logits or None) a student row learns from."""
        if s.kind == "supervised":
            return dataset.train, len(dataset.train), None
        if with_transfer:
            sp, nl, ch = split, n_labeled, cache
        else:  # the train split is the first rows of the distillation split
            sp, nl, ch = dataset.train, len(dataset.train), cache[:, :len(dataset.train)]
        return sp, nl, (ch[best:best + 1] if s.teachers == "best" else ch)

    jobs = [(s.name, s, True) for s in strategies if s.kind != "codistill"]
    if use_transfer:
        jobs += [(f"{s.name} (no transfer)", s, False) for s in no_transfer]
    student = None
    for row, s, with_transfer in jobs:
        t0 = time.perf_counter()
        sp, nl, ch = row_data(s, with_transfer)
        params, s_apply, result, total = train_student(
            ctx, row, s, cache=ch, split=sp, n_labeled=nl,
            weighting=weightings.get(s.name, "uniform"), fingerprint=fingerprint,
        )
        infer = ctx.cached(("jit", s_apply), lambda s_apply=s_apply: jax.jit(s_apply))
        rows[row] = evaluate_logits(_predict(infer, params, dataset.test.x), test_y, ens)
        histories[row], steps[row] = result.history, total
        seconds[row] = time.perf_counter() - t0
        student = (s_apply, params)

    if any(s.kind == "codistill" for s in strategies):
        t0 = time.perf_counter()
        co_split, co_labeled = _distill_split(ctx, use_transfer)
        co_params, co_result, total = codistill(
            ctx, teacher_params, trained_teachers.members[0][0], split=co_split,
            n_labeled=co_labeled, fingerprint=fingerprint,
        )
        co_logits = _predict(stacked_apply, co_params, dataset.test.x)
        each = [evaluate_logits(co_logits[i], test_y, ens) for i in range(k)]
        rows["codistill (each)"] = {m: float(np.mean([e[m] for e in each])) for m in each[0]}
        co_ens = np.mean(_softmax_np(co_logits), axis=0)
        rows["codistill (ensemble)"] = evaluate_logits(_log_probs(co_ens), test_y, ens)
        histories["codistill"], steps["codistill"] = co_result.history, total
        seconds["codistill"] = time.perf_counter() - t0

    result = SeedResult(
        seed=seed, rows=rows, teacher_val_accuracy=[float(a) for a in val_acc],
        divergence=divergence, targets=targets, weights=weights, histories=histories,
        steps=steps, seconds=seconds,
    )
    trained = {"teacher": trained_teachers.members[0], "ensemble": (stacked_apply, teacher_params)}
    if student is not None:
        trained["student"] = student
    return result, trained


# ---------------------------------------------------------------------------------------------
# The run


def _config_json(config) -> dict:
    d = json.loads(config.to_json_best_effort())
    for key in _IGNORED_KEYS:
        d.pop(key, None)
    return d


def prepare_run_dir(config) -> str:
    """Create the run folder and write `config.json`; refuse one made with another config.

    Re-running the same command in the same folder resumes it: finished trainings are read
    back from their checkpoints and unfinished ones continue. A different config (other than
    `progress` and `log_every`) in an existing folder is refused, so results never mix.

    Returns:
      The absolute run folder path.
    """
    run_dir = os.path.abspath(config.output_dir)
    path = os.path.join(run_dir, "config.json")
    current = _config_json(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        saved = {k: v for k, v in saved.items() if k not in _IGNORED_KEYS}
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{run_dir} holds a run made with another config (differs in {diff}); use "
                "another `--config.output_dir` or delete that folder."
            )
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return run_dir


def _compression_labels(config) -> dict[str, str]:
    t = config.teachers
    names = tuple(t.models) or (t.model,) * t.num
    ensemble = f"{t.num} x {names[0]}" if len(set(names)) == 1 else " + ".join(names)
    return {"student": f"student ({config.student.model})",
            "teacher": f"one teacher ({names[0]})", "ensemble": f"ensemble ({ensemble})"}


def _environment() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "command": " ".join(["python", *sys.argv]),
    }


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    """Run the pipeline over `config.seeds` seeds and write the run folder.

    The config is checked first (`validate_config`), before any data is loaded or model
    trained. With `config.distributed` (or `MTKD_*` variables that ask for it, see
    `mtkd_jax.distributed`), `initialize_distributed()` is called before any other JAX work,
    taking the coordinator, process count and id from `MTKD_*` variables or JAX's cluster
    detection, and every host feeds its slice of each global batch.

    Args:
      config: see `mtkd_jax.experiment.config.default_config`.

    Returns:
      An `ExperimentResult`; the run folder holds `results.md`, `results.csv`,
      `results_per_seed.csv`, `analysis.json`, `histories.json`, PNG plots, TensorBoard
      events, `config.json` and checkpoints.
    """
    from mtkd_jax.experiment import compression, report

    strategies = validate_config(config)
    from mtkd_jax import distributed

    if config.distributed or distributed.distributed_requested():
        distributed.initialize_distributed()
    validate_config(config, num_devices=jax.device_count())
    start = time.perf_counter()
    dataset = data_lib.load(config.dataset, data_dir=config.data_dir or None)
    run_dir = prepare_run_dir(config)
    transfer_x = None
    if config.transfer.size:
        t0 = time.perf_counter()
        transfer_x = data_lib.mnist1d_transfer_set(
            config.transfer.size, seed=config.transfer.seed, info=dataset.info
        )
        _log(f"transfer set: {len(transfer_x)} unlabeled inputs "
             f"({time.perf_counter() - t0:.1f} s)")
    mesh = parallel.data_mesh()
    _log(f"devices: {jax.device_count()} ({jax.default_backend()}), processes: "
         f"{jax.process_count()}; run folder: {run_dir}")
    seeds, trained, shared = [], None, {}
    for seed in range(config.first_seed, config.first_seed + config.seeds):
        result, models_of_seed = run_seed(config, seed, dataset, transfer_x, mesh, run_dir,
                                          strategies, shared)
        seeds.append(result)
        trained = trained or models_of_seed
    comp = []
    if config.compression.enabled:
        comp = compression.measure(
            trained, example_x=dataset.test.x, labels=_compression_labels(config),
            repeats=config.compression.repeats,
        )
    result = ExperimentResult(
        config=config, run_dir=run_dir, seeds=seeds, compression=comp,
        environment=_environment(), wall_seconds=time.perf_counter() - start, files=[],
    )
    if jax.process_index() == 0:
        result.files = report.write_report(result, strategies)
        print(report.summary(result, strategies), flush=True)
    return result
