"""Stage 5 of a seed: the students of every strategy, and codistillation of the teachers.

A smaller student is distilled with each strategy (and trained alone, and from the best
single teacher) on the labeled train split plus an optional transfer set of unlabeled inputs
that only the teachers label; rows of `config.distill.train_only` again without the transfer
set. Students read the teachers' logits from a cache computed once per seed, so the teachers
run once per example instead of once per step. Then the article's worked variant: the K
teachers codistilled toward each other's leave-one-out targets. Every row is evaluated on
the test set.

The rows that learn from the same data with the same objective (e.g. every KL row on the
transfer set) train at once, one stacked program (`stacked_step`): each row's fused target
is computed once for the whole split from the cache (`distill_targets` with the row's
weighting, exactly what a one-row step computes per batch, since every weighting is per
example) and is the row's own single "teacher" (`per_model`). Every row starts from the same
initial student and sees the same batches, as when the rows trained one after another.

Engine calls (all in this module): `mtkd_jax.training.steps` (`make_supervised_step`,
`make_distill_step`, `stacked_step`, `make_codistill_step`), `mtkd_jax.training.state`
(`init_stacked_train_state`) and `mtkd_jax.objective.targets.distill_targets`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import data as data_lib
from mtkd_jax.experiment.analysis import Analysis, evaluate_logits, log_probs, softmax_np
from mtkd_jax.experiment.config import Strategy, parse_strategy
from mtkd_jax.experiment.context import (
    Context,
    fit,
    model_kwargs,
    optimizer,
    predict,
    stacked_accuracy_eval,
    to_global,
)
from mtkd_jax.experiment.teachers import Teachers
from mtkd_jax.objective.targets import distill_targets
from mtkd_jax.training.state import init_stacked_train_state
from mtkd_jax.training.steps import (
    make_codistill_step,
    make_distill_step,
    make_supervised_step,
    stacked_step,
)

__all__ = ["Group", "Students", "codistill", "student_groups", "train_group", "train_students"]

_TARGET_CHUNK = 8192  # examples per call when fusing a row's targets over its split
_targets = jax.jit(distill_targets, static_argnames=("temperature", "weighting"))


class Group(NamedTuple):
    """Student rows trained at once: one data split, one kind of step, one soft loss.

    Attributes:
      name: the rows' names joined by ``+`` (its checkpoint folder and training key).
      rows: the row names, e.g. ``("mean", "mean (no transfer)")``.
      strategies: their `Strategy`, in the same order.
      transfer: whether they learn on the train split plus the transfer set.
      soft_loss: ``"kl"`` or ``"mse"`` (None for the supervised row).
    """

    name: str
    rows: tuple[str, ...]
    strategies: tuple[Strategy, ...]
    transfer: bool
    soft_loss: str | None


def student_groups(strategies, train_only, *, use_transfer: bool, soft_loss: str) -> list:
    """Group the student rows (every strategy but codistillation, and the `train_only` rows
    without the transfer set) into `Group`s, in the order of their first row.

    Example:
      >>> from mtkd_jax.experiment.config import parse_strategy
      >>> from mtkd_jax.experiment.students import student_groups
      >>> rows = [parse_strategy(n) for n in ("alone", "mean", "mean_mse", "entropy")]
      >>> [g.rows for g in student_groups(rows, [rows[1]], use_transfer=True, soft_loss="kl")]
      [('alone',), ('mean', 'entropy'), ('mean_mse',), ('mean (no transfer)',)]
    """
    jobs = [(s.name, s, use_transfer) for s in strategies if s.kind == "distill"]
    jobs = [(s.name, s, False) for s in strategies if s.kind == "supervised"] + jobs
    if use_transfer:
        jobs += [(f"{s.name} (no transfer)", s, False) for s in train_only]
    order = {s.name: i for i, s in enumerate(strategies)}
    jobs.sort(key=lambda j: (j[0].endswith("(no transfer)"), order.get(j[1].name, 0)))
    groups: dict[tuple, list] = {}
    for row, s, transfer in jobs:
        loss = None if s.kind == "supervised" else (s.soft_loss or soft_loss)
        groups.setdefault((s.kind, transfer, loss), []).append((row, s))
    return [Group("+".join(r for r, _ in members), tuple(r for r, _ in members),
                  tuple(s for _, s in members), transfer, loss)
            for (_, transfer, loss), members in groups.items()]


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


def _row_logits(ctx: Context, cache, split, n_labeled, strategy, weighting, best):
    """`[N, C]` logits whose softmax at T is the row's fused target over `split`."""
    t = ctx.config.distill.temperature
    if strategy.teachers == "best":
        return cache[best]
    out = []
    for i in range(0, len(split), _TARGET_CHUNK):
        idx = np.arange(i, min(i + _TARGET_CHUNK, len(split)))
        mask = jnp.asarray(idx < n_labeled, jnp.float32)
        fused = _targets(jnp.asarray(cache[:, idx]), jnp.asarray(split.y[idx]),
                         label_mask=mask, temperature=t, weighting=weighting).targets
        out.append(t * log_probs(np.asarray(fused)))  # softmax(t log p / t) = p
    return np.concatenate(out)


def _batches(ctx, split, n_labeled, row_logits, batch_size):
    def batches_fn(epoch, start):
        for b in data_lib.batches(split, batch_size=batch_size, seed=ctx.seed, epoch=epoch,
                                  start=start):
            idx = b["index"]
            out = {"x": b["x"], "y": b["y"]}
            if n_labeled < len(split):
                out["label_mask"] = (idx < n_labeled).astype(np.float32)
            if row_logits is not None:
                out["teacher_logits"] = row_logits[:, idx]  # [R, B, C], row k's own target
            yield to_global(out, ctx.mesh)

    return batches_fn


def _member_history(history: dict, k: int) -> dict:
    """Row k's history out of a stacked training's (every metric's leading axis is the row;
    the eval accuracy is ``accuracy_per_teacher``)."""

    def pick(record):
        out = {}
        for name, v in record.items():
            if name == "accuracy_per_teacher":
                out["accuracy"] = v[k]
            elif name == "accuracy" and "accuracy_per_teacher" in record:
                continue
            elif isinstance(v, list):
                out[name] = v[k]
            else:
                out[name] = v
        return out

    return {part: [pick(r) for r in records] for part, records in history.items()}


def train_group(ctx: Context, group: Group, *, split, n_labeled, row_logits, fingerprint):
    """Train a `Group`'s rows at once; return (stacked params, apply_fn, fit result, updates).

    Args:
      row_logits: `[R, N, C]` the rows' target logits over `split` (None when supervised).
    """
    cfg, dcfg = ctx.config.student, ctx.config.distill
    model, apply_fn = ctx.model(cfg.model, model_kwargs(cfg))
    spe = data_lib.num_batches(split, batch_size=cfg.batch_size)
    epochs = max(1, round(cfg.steps / spe))
    total = spe * epochs
    supervised = row_logits is None

    def build():
        tx = optimizer(cfg.learning_rate, total, cfg.weight_decay)
        if supervised:
            return tx, stacked_step(make_supervised_step(apply_fn, tx))
        one = make_distill_step(apply_fn, None, tx, soft_loss=group.soft_loss,
                                temperature=dcfg.temperature, alpha=dcfg.alpha)

        def own_teacher(state, batch, key):  # row k's target logits [B, C] -> [1, B, C]
            return one(state, {**batch, "teacher_logits": batch["teacher_logits"][None]}, key)

        return tx, stacked_step(own_teacher, per_model=("teacher_logits",))

    tx, step = ctx.parallel(("students", group.name, total), build)
    key = ctx.key_for("student init")  # every row starts from the same initial student
    params = ctx.init(cfg.model, model_kwargs(cfg), key, jnp.asarray(split.x[:1]))
    r = len(group.rows)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (r, *a.shape)), params)
    result = fit(ctx, group.name, init_stacked_train_state(stacked, tx), step,
                 _batches(ctx, split, n_labeled, row_logits, cfg.batch_size),
                 steps_per_epoch=spe, epochs=epochs,
                 eval_fn=stacked_accuracy_eval(ctx, apply_fn), fingerprint=fingerprint)
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
                 _batches(ctx, split, n_labeled, None, ctx.config.teachers.batch_size),
                 steps_per_epoch=spe, epochs=cfg.epochs,
                 eval_fn=stacked_accuracy_eval(ctx, apply_fn), fingerprint=fingerprint)
    return result.state.params, result, total


class Students(NamedTuple):
    """What stage 5 measured.

    Attributes:
      rows: test metrics of every student row and of ``codistill (each)`` /
        ``codistill (ensemble)``, in training order.
      histories, steps: per row (``codistill`` for codistillation).
      seconds: per `Group` name, ``codistill``, and ``targets`` (the teachers' logit cache
        and the rows' fused targets).
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
    row (grouped, `student_groups`), then codistil the teachers when a strategy asks."""
    config, dataset = ctx.config, ctx.ds
    test_y, ens, best = dataset.test.y, analysis.ensemble_probs, analysis.best
    rows: dict[str, dict[str, float]] = {}
    histories: dict[str, dict] = {}
    steps: dict[str, int] = {}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    use_transfer = ctx.transfer_x is not None
    split, n_labeled = _distill_split(ctx, use_transfer)
    groups = student_groups(strategies, [parse_strategy(n) for n in config.distill.train_only],
                            use_transfer=use_transfer, soft_loss=config.distill.soft_loss)
    data = {}
    with ctx.times.stage("teacher logits, targets"):
        cache = predict(teachers.apply, teachers.params, split.x)  # [K, N, C]
        for g in groups:
            if g.transfer:
                sp, nl, ch = split, n_labeled, cache
            else:  # the train split is the first rows of the distillation split
                sp, nl, ch = dataset.train, len(dataset.train), cache[:, :len(dataset.train)]
            logits = None if g.soft_loss is None else np.stack([
                _row_logits(ctx, ch, sp, nl, s, analysis.weightings.get(s.name), best)
                for s in g.strategies])
            data[g.name] = (sp, nl, logits)
    seconds["targets"] = time.perf_counter() - t0

    student = None
    for g in groups:
        t0 = time.perf_counter()
        sp, nl, logits = data.pop(g.name)
        with ctx.times.stage("students"):
            params, s_apply, result, total = train_group(
                ctx, g, split=sp, n_labeled=nl, row_logits=logits,
                fingerprint=teachers.fingerprint)
        with ctx.times.stage("test evaluation"):
            infer = ctx.cached(("vmapped", s_apply),
                               lambda s_apply=s_apply: jax.jit(jax.vmap(s_apply, (0, None))))
            test_logits = predict(infer, params, dataset.test.x)  # [R, N, C]
            for k, row in enumerate(g.rows):
                rows[row] = evaluate_logits(test_logits[k], test_y, ens)
                histories[row], steps[row] = _member_history(result.history, k), total
        seconds[g.name] = time.perf_counter() - t0
        student = (s_apply, jax.tree.map(lambda a: a[-1], params))
    rows = {row: rows[row] for row in _row_order(strategies, rows)}

    if any(s.kind == "codistill" for s in strategies):
        t0 = time.perf_counter()
        with ctx.times.stage("codistillation"):
            co_params, co_result, total = codistill(
                ctx, teachers.params, teachers.members[0][0], split=split,
                n_labeled=n_labeled, fingerprint=teachers.fingerprint,
            )
        co_logits = predict(teachers.apply, co_params, dataset.test.x)
        each = [evaluate_logits(co_logits[i], test_y, ens) for i in range(config.teachers.num)]
        rows["codistill (each)"] = {m: float(np.mean([e[m] for e in each])) for m in each[0]}
        co_ens = np.mean(softmax_np(co_logits), axis=0)
        rows["codistill (ensemble)"] = evaluate_logits(log_probs(co_ens), test_y, ens)
        histories["codistill"], steps["codistill"] = co_result.history, total
        seconds["codistill"] = time.perf_counter() - t0
    return Students(rows, histories, steps, seconds, student)


def _row_order(strategies, rows) -> list[str]:
    """The rows in the config's order, then the ``(no transfer)`` rows."""
    first = [s.name for s in strategies if s.name in rows]
    return first + [r for r in rows if r not in first]
