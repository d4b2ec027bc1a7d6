"""Stage 1 and the routing fits of a multi-source seed (`config.sources.kind` != "same").

* `train_source_teachers`: K teachers of one architecture, each trained alone on its own
  share of the train split (`mtkd_jax.experiment.sources`). With ``"classes"`` each teacher
  knows only its class group: its logits are put in the global class space with
  `mtkd_jax.core.class_sets.mask_unknown` (unknown classes get `UNKNOWN_LOGIT`), so every later
  stage (analysis, the logit cache, every student row) sees global-space logits in which each
  teacher's softmax is renormalised over its own classes.
* `routing_weightings`: the label-free routing strategies with their fitted
  hyperparameters: per-teacher temperatures (`fit_temperature` on each teacher's own
  validation share) and the gate (`fit_gate` on the labeled train and validation splits).

Engine calls: `mtkd_jax.training.steps.make_supervised_step`,
`mtkd_jax.training.state.init_train_state`,
`mtkd_jax.teachers.make_stacked_apply`, `mtkd_jax.core.class_sets`, `mtkd_jax.weighting`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import data as data_lib
from mtkd_jax import models
from mtkd_jax import teachers as teachers_lib
from mtkd_jax.core import class_sets
from mtkd_jax.experiment.context import (
    Context,
    accuracy_eval,
    fit,
    model_kwargs,
    optimizer,
    predict,
    to_global,
)
from mtkd_jax.experiment.sources import class_groups, source_splits
from mtkd_jax.experiment.teachers import Teachers, teacher_names
from mtkd_jax.training.checkpoint import params_fingerprint
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_supervised_step
from mtkd_jax.weighting import fit_gate, fit_temperature, get_weighting

__all__ = ["ROUTING", "known_classes", "train_source_teachers", "routing_weightings"]

ROUTING = ("energy", "max_logit", "calibrated", "gate")
"""The routing weightings whose hyperparameters are fitted here."""


def known_classes(config, num_classes: int) -> np.ndarray:
    """`[K, C]` bool: the classes each teacher knows (all, unless ``"classes"``)."""
    if config.sources.kind == "classes":
        return class_sets.known_mask(class_groups(config, num_classes), num_classes=num_classes)
    return np.ones((config.teachers.num, num_classes), bool)


def _splits(ctx: Context):
    return source_splits(ctx.config, ctx.ds.train.y, ctx.seed, num_classes=ctx.num_classes,
                         validation_labels=ctx.ds.validation.y)


def train_source_teachers(ctx: Context) -> Teachers:
    """Train teacher k on its own source only; return the K teachers as one stacked,
    global-space ensemble (`Teachers`), fingerprinted and (with `config.checkpoints`) saved."""
    config, cfg = ctx.config, ctx.config.teachers
    if cfg.models and len(set(cfg.models)) > 1:
        raise ValueError("multi-source teachers share one architecture; leave "
                         "`config.teachers.models` empty.")
    train = ctx.ds.train
    model, apply_fn = ctx.model(cfg.model, model_kwargs(cfg))
    example = jnp.asarray(train.x[:1])
    keys = jax.random.split(ctx.key_for("teacher init"), cfg.num)
    lrs = tuple(cfg.learning_rates) or (cfg.learning_rate,) * cfg.num
    train_idx, _ = _splits(ctx)
    members, histories, steps = [], {}, 0
    for k, idx in enumerate(train_idx):
        split = data_lib.Split(f"train[source {k}]", train.x[idx], train.y[idx])
        spe = data_lib.num_batches(split, batch_size=cfg.batch_size)
        total = spe * cfg.epochs

        def build(lr=lrs[k], total=total):
            tx = optimizer(lr, total, cfg.weight_decay)
            return tx, make_supervised_step(apply_fn, tx)

        tx, step = ctx.parallel(("source teacher", apply_fn, total, lrs[k]), build)

        def batches_fn(epoch, start, split=split):
            for b in data_lib.batches(split, batch_size=cfg.batch_size, seed=ctx.seed,
                                      epoch=epoch, start=start):
                yield to_global({"x": b["x"], "y": b["y"]}, ctx.mesh)

        state = init_train_state(models.init_params(model, keys[k], example), tx)
        result = fit(ctx, f"teacher_{k}", state, step, batches_fn, steps_per_epoch=spe,
                     epochs=cfg.epochs, eval_fn=accuracy_eval(ctx, apply_fn))
        members.append((apply_fn, result.state.params))
        histories[f"teacher_{k}"] = result.history
        steps = max(steps, total)
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[p for _, p in members])
    known = known_classes(config, ctx.num_classes)
    full = bool(known.all())

    def build_apply():
        stacked = teachers_lib.make_stacked_apply(apply_fn, strategy="vmap")
        if full:
            return jax.jit(stacked)
        return jax.jit(lambda p, x: class_sets.mask_unknown(stacked(p, x), known))

    apply = ctx.cached(("source teachers", apply_fn, known.tobytes()), build_apply)
    names = teacher_names(cfg.num)
    teachers = Teachers(params, apply, members, (cfg.model,) * cfg.num, histories, steps,
                        params_fingerprint(params, names=names))
    if config.checkpoints:
        teachers_lib.save_teachers(
            os.path.join(ctx.run_dir, "checkpoints", f"seed{ctx.seed}", "teachers_final"),
            jax.device_get(params), names=names,
            meta={"models": list(teachers.labels), "sources": config.sources.to_dict(),
                  "known": known.astype(int).tolist(), "seed": ctx.seed},
            overwrite=True,
        )
    return teachers


def routing_weightings(ctx: Context, teachers: Teachers, strategies,
                       val_logits: np.ndarray) -> dict:
    """Strategy name -> fitted routing weighting, for the rows that route.

    * ``energy``, ``max_logit``: the raw logits (their papers' definition), sharpness 1;
    * ``calibrated``: temperatures from `fit_temperature` of teacher k on its own validation
      share (the part of the validation split from its source);
    * ``gate``: `fit_gate(features=True, hidden=config.distill.gate_hidden)` on the labeled
      examples, the train and validation splits (the labels say which teacher explains each
      example best; the gate then routes every input, the unlabeled transfer set included,
      without labels).
    """
    rows = [s for s in strategies if s.kind == "distill" and s.weighting in ROUTING]
    out = {}
    for s in rows:
        if s.weighting == "calibrated":
            val_y = ctx.ds.validation.y
            _, val_idx = _splits(ctx)
            temps = np.array([fit_temperature(val_logits[k, idx], val_y[idx]) if len(idx)
                              else 1.0 for k, idx in enumerate(val_idx)], np.float32)
            out[s.name] = get_weighting("calibrated", temperatures=temps)
        elif s.weighting == "gate":
            train_logits = predict(teachers.apply, teachers.params, ctx.ds.train.x)
            z = np.concatenate([train_logits, val_logits], axis=1)
            y = np.concatenate([ctx.ds.train.y, ctx.ds.validation.y]).astype(np.int32)
            hidden = ctx.config.distill.gate_hidden
            fitted = fit_gate(z, y, features=True, hidden=hidden,
                              key=ctx.key_for("gate init") if hidden else None)
            out[s.name] = get_weighting("gate", **jax.tree.map(np.asarray, fitted))
        else:
            out[s.name] = get_weighting(s.weighting)
    return out
