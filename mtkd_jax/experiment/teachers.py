"""Stage 1 of a seed: train the K teachers, save them, fingerprint them.

K teachers of one architecture train at once, one vmapped program with different initial
parameters and optionally different learning rates (`config.teachers.learning_rates`);
teachers of mixed architectures (`config.teachers.models`) train one after another with the
same loop.

Engine calls (all in this module): `mtkd_jax.training.steps` (`make_supervised_step`, and
`stacked_step` for K teachers at once), `mtkd_jax.training.state` (`init_train_state`,
`init_stacked_train_state`, `set_hyperparams`) and `mtkd_jax.teachers`
(`make_stacked_apply`, `make_heterogeneous_apply`, `save_teachers`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtkd_jax import data as data_lib
from mtkd_jax import teachers as teachers_lib
from mtkd_jax.experiment.context import (
    Context,
    accuracy_eval,
    fit,
    model_kwargs,
    optimizer,
    stacked_accuracy_eval,
    to_global,
)
from mtkd_jax.training.checkpoint import params_fingerprint
from mtkd_jax.training.state import init_stacked_train_state, init_train_state, set_hyperparams
from mtkd_jax.training.steps import make_supervised_step, stacked_step

__all__ = ["Teachers", "teacher_names", "train_teachers"]


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
      fingerprint: `params_fingerprint` of the teachers, recorded by every later checkpoint
        of the seed (None until `train_teachers` sets it).
    """

    params: Any
    apply: Callable
    members: list
    labels: tuple
    histories: dict
    steps: int
    fingerprint: dict | None = None


def teacher_names(k: int) -> list[str]:
    """The row names of K teachers: ``teacher_0``, ..."""
    return [f"teacher_{i}" for i in range(k)]


def _kwargs_of(ctx: Context, name: str) -> dict[str, Any]:
    """`teachers.model_kwargs` for `teachers.model`; another architecture its defaults."""
    cfg = ctx.config.teachers
    return model_kwargs(cfg) if name == cfg.model else {}


def _teacher_models(ctx: Context) -> list[tuple[str, Any, Callable]]:
    """(name, model, apply) per teacher: K of `teachers.model`, or `teachers.models`."""
    cfg = ctx.config.teachers
    names = tuple(cfg.models) or (cfg.model,) * cfg.num
    out = []
    for name in names:
        model, apply_fn = ctx.model(name, _kwargs_of(ctx, name))
        out.append((name, model, apply_fn))
    return out


def _train(ctx: Context) -> Teachers:
    """Train the K teachers: one vmapped program for one architecture, else one by one."""
    cfg = ctx.config.teachers
    train = ctx.ds.train
    spe = data_lib.num_batches(train, batch_size=cfg.batch_size)
    total = spe * cfg.epochs

    def make_tx(learning_rate):
        return optimizer(learning_rate, total, cfg.weight_decay)

    def teacher_tx():
        # Learning rate injected: one per teacher when `teachers.learning_rates` is set.
        return optax.inject_hyperparams(make_tx)(learning_rate=cfg.learning_rate)

    def build_stacked(apply_fn):
        tx = teacher_tx()
        return tx, stacked_step(make_supervised_step(apply_fn, tx))

    def build_single(apply_fn):
        tx = teacher_tx()
        return tx, make_supervised_step(apply_fn, tx)

    example = jnp.asarray(train.x[:1])
    keys = jax.random.split(ctx.key_for("teacher init"), cfg.num)
    lrs = tuple(cfg.learning_rates)

    def batches_fn(epoch, start):
        for b in data_lib.batches(train, batch_size=cfg.batch_size, seed=ctx.seed, epoch=epoch,
                                  start=start):
            yield to_global({"x": b["x"], "y": b["y"]}, ctx.mesh)

    specs = _teacher_models(ctx)
    labels = tuple(name for name, _, _ in specs)
    if len(set(labels)) == 1:
        _, _, apply_fn = specs[0]
        hyper = {"learning_rate": jnp.asarray(lrs, jnp.float32)} if lrs else None
        tx, step = ctx.parallel(("teachers", apply_fn, total), lambda: build_stacked(apply_fn))
        params = ctx.init(specs[0][0], _kwargs_of(ctx, specs[0][0]), keys, example,
                          stacked=True)
        state = init_stacked_train_state(params, tx, hyperparams=hyper)
        result = fit(ctx, "teachers", state, step, batches_fn, steps_per_epoch=spe,
                     epochs=cfg.epochs, eval_fn=stacked_accuracy_eval(ctx, apply_fn))
        params = result.state.params
        members = [(apply_fn, jax.tree.map(lambda a, i=i: a[i], params))
                   for i in range(cfg.num)]
        stacked_apply = ctx.cached(("stacked", apply_fn), lambda: jax.jit(
            teachers_lib.make_stacked_apply(apply_fn, strategy="vmap")))
        return Teachers(params, stacked_apply, members, labels, {"teachers": result.history},
                        result.step)

    # Mixed architectures: the same loop, one teacher after another.
    members, histories = [], {}
    for i, (name, _, apply_fn) in enumerate(specs):
        tx, step = ctx.parallel(("teacher", apply_fn, total),
                                lambda apply_fn=apply_fn: build_single(apply_fn))
        state = init_train_state(ctx.init(name, _kwargs_of(ctx, name), keys[i], example), tx)
        if lrs:
            state = set_hyperparams(state, {"learning_rate": lrs[i]})
        result = fit(ctx, f"teacher_{i}", state, step, batches_fn, steps_per_epoch=spe,
                     epochs=cfg.epochs, eval_fn=accuracy_eval(ctx, apply_fn))
        members.append((apply_fn, result.state.params))
        histories[f"teacher_{i}"] = result.history
    params = tuple(p for _, p in members)
    apply = ctx.cached(("heterogeneous", labels), lambda: jax.jit(
        teachers_lib.make_heterogeneous_apply([a for a, _ in members], names=labels)))
    return Teachers(params, apply, members, labels, histories, spe * cfg.epochs)


def train_teachers(ctx: Context) -> Teachers:
    """Train the K teachers of this seed, fingerprint them, and with `config.checkpoints`
    save them to ``checkpoints/seed<s>/teachers_final``.

    Returns:
      The `Teachers`, with their `fingerprint` set.
    """
    config, seed = ctx.config, ctx.seed
    teachers = _train(ctx)
    names = teacher_names(config.teachers.num)
    teachers = teachers._replace(fingerprint=params_fingerprint(teachers.params, names=names))
    if config.checkpoints:  # every process: orbax saves are collective across hosts
        teachers_lib.save_teachers(
            os.path.join(ctx.run_dir, "checkpoints", f"seed{seed}", "teachers_final"),
            jax.device_get(teachers.params), names=names,
            meta={"models": list(teachers.labels),
                  "model_kwargs": config.teachers.model_kwargs.to_dict(), "seed": seed},
            overwrite=True,
        )
    return teachers
