"""Stage 5 of a seed: the students of every strategy, and codistillation of the teachers.

A smaller student is distilled with each strategy (and trained alone, and from the best
single teacher) on the labeled train split plus an optional transfer set of unlabeled inputs
that only the teachers label; rows of `config.distill.train_only` again without the transfer
set. Students read the teachers' logits from a cache computed once per seed, so the teachers
run once per example instead of once per step. Then the article's worked variant: the K
teachers codistilled toward each other's leave-one-out targets. Every row is evaluated on
the test set.

Engine calls (all in this module): `mtkd_jax.steps` (`make_supervised_step`,
`make_distill_step`, `make_codistill_step`) and `mtkd_jax.state` (`init_train_state`,
`init_stacked_train_state`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import data as data_lib
from mtkd_jax import models
from mtkd_jax.experiment.analysis import Analysis, evaluate_logits, log_probs, softmax_np
from mtkd_jax.experiment.config import Strategy, parse_strategy
from mtkd_jax.experiment.context import (
    Context,
    accuracy_eval,
    fit,
    model_kwargs,
    optimizer,
    predict,
    stacked_accuracy_eval,
    to_global,
)
from mtkd_jax.experiment.teachers import Teachers
from mtkd_jax.state import init_stacked_train_state, init_train_state
from mtkd_jax.steps import make_codistill_step, make_distill_step, make_supervised_step

__all__ = ["Students", "codistill", "train_student", "train_students"]


def _distill_split(ctx: Context, use_transfer: bool):
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
            yield to_global(out, ctx.mesh)

    return batches_fn


def train_student(ctx: Context, name: str, strategy: Strategy, *, cache, split, n_labeled,
                  weighting, fingerprint):
    """Train one student row; return (params, apply_fn, fit result, number of updates)."""
    cfg, dcfg = ctx.config.student, ctx.config.distill
    model, apply_fn = ctx.model(cfg.model, model_kwargs(cfg))
    spe = data_lib.num_batches(split, batch_size=cfg.batch_size)
    epochs = max(1, round(cfg.steps / spe))
    total = spe * epochs

    def build():
        tx = optimizer(cfg.learning_rate, total, cfg.weight_decay)
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
    result = fit(ctx, name, init_train_state(params, tx), step,
                 _student_batches(ctx, split, n_labeled, cache, cfg.batch_size),
                 steps_per_epoch=spe, epochs=epochs, eval_fn=accuracy_eval(ctx, apply_fn),
                 fingerprint=fingerprint)
    return result.state.params, apply_fn, result, total


def codistill(ctx: Context, teacher_params, apply_fn, *, split, n_labeled, fingerprint):
    """The article's worked project: the K teachers refine each other (leave-one-out targets)."""
    cfg = ctx.config.codistill
    spe = data_lib.num_batches(split, batch_size=ctx.config.teachers.batch_size)
    total = spe * cfg.epochs

    def build():
        tx = optimizer(cfg.learning_rate, total, 0.0)
        return tx, make_codistill_step(apply_fn, tx, soft_loss=cfg.soft_loss,
                                       temperature=cfg.temperature, alpha=cfg.alpha)

    tx, step = ctx.parallel(("codistill", apply_fn, total), build)
    state = init_stacked_train_state(jax.tree.map(jnp.array, teacher_params), tx)
    result = fit(ctx, "codistill", state, step,
                 _student_batches(ctx, split, n_labeled, None, ctx.config.teachers.batch_size),
                 steps_per_epoch=spe, epochs=cfg.epochs,
                 eval_fn=stacked_accuracy_eval(ctx, apply_fn), fingerprint=fingerprint)
    return result.state.params, result, total


class Students(NamedTuple):
    """What stage 5 measured.

    Attributes:
      rows: test metrics of every student row and of ``codistill (each)`` /
        ``codistill (ensemble)``, in training order.
      histories, steps, seconds: per row (``codistill`` for codistillation; seconds also
        ``cache``, filling the logit cache).
      student: `(apply_fn, params)` of the last student trained (for the compression
        measurements), or None.
    """

    rows: dict[str, dict[str, float]]
    histories: dict[str, dict]
    steps: dict[str, int]
    seconds: dict[str, float]
    student: tuple[Callable, Any] | None


def train_students(ctx: Context, teachers: Teachers, analysis: Analysis,
                   strategies) -> Students:
    """Stage 5: fill the logit cache of the distillation split, train and test every student
    row, then codistil the teachers when a strategy asks for it."""
    config, dataset = ctx.config, ctx.ds
    test_y, ens, best = dataset.test.y, analysis.ensemble_probs, analysis.best
    rows: dict[str, dict[str, float]] = {}
    histories: dict[str, dict] = {}
    steps: dict[str, int] = {}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    use_transfer = ctx.transfer_x is not None
    split, n_labeled = _distill_split(ctx, use_transfer)
    cache = predict(teachers.apply, teachers.params, split.x)  # [K, N, C]
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

    no_transfer = [parse_strategy(n) for n in config.distill.train_only]
    jobs = [(s.name, s, True) for s in strategies if s.kind != "codistill"]
    if use_transfer:
        jobs += [(f"{s.name} (no transfer)", s, False) for s in no_transfer]
    student = None
    for row, s, with_transfer in jobs:
        t0 = time.perf_counter()
        sp, nl, ch = row_data(s, with_transfer)
        params, s_apply, result, total = train_student(
            ctx, row, s, cache=ch, split=sp, n_labeled=nl,
            weighting=analysis.weightings.get(s.name, "uniform"),
            fingerprint=teachers.fingerprint,
        )
        infer = ctx.cached(("jit", s_apply), lambda s_apply=s_apply: jax.jit(s_apply))
        rows[row] = evaluate_logits(predict(infer, params, dataset.test.x), test_y, ens)
        histories[row], steps[row] = result.history, total
        seconds[row] = time.perf_counter() - t0
        student = (s_apply, params)

    if any(s.kind == "codistill" for s in strategies):
        t0 = time.perf_counter()
        co_split, co_labeled = _distill_split(ctx, use_transfer)
        co_params, co_result, total = codistill(
            ctx, teachers.params, teachers.members[0][0], split=co_split,
            n_labeled=co_labeled, fingerprint=teachers.fingerprint,
        )
        co_logits = predict(teachers.apply, co_params, dataset.test.x)
        each = [evaluate_logits(co_logits[i], test_y, ens) for i in range(config.teachers.num)]
        rows["codistill (each)"] = {m: float(np.mean([e[m] for e in each])) for m in each[0]}
        co_ens = np.mean(softmax_np(co_logits), axis=0)
        rows["codistill (ensemble)"] = evaluate_logits(log_probs(co_ens), test_y, ens)
        histories["codistill"], steps["codistill"] = co_result.history, total
        seconds["codistill"] = time.perf_counter() - t0
    return Students(rows, histories, steps, seconds, student)
