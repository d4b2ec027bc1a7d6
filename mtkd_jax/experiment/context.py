"""What every stage of one seed shares: the `Context` and `fit`, the one train loop.

`Context` holds a seed's config, data, mesh and run folder, and builds the models, jitted
functions and data-parallel steps once per run (`Context.cached`), so every seed reuses what
the first one compiled. `fit` is `mtkd_jax.training.fit.fit` as every stage calls it: a key
per model name, a few validation points per training, checkpoints and TensorBoard events under
the run folder. The rest are the small pieces the stages share: the optimizer, chunked inference and
the validation-accuracy evaluations.

Engine calls here: `parallel.data_parallel_step` (`Context.parallel`),
`parallel.global_batch_from_local` (`to_global`) and `mtkd_jax.training.fit.fit` (`fit`).
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtkd_jax import models, parallel
from mtkd_jax.experiment import summaries
from mtkd_jax.experiment.dataset_check import model_kwargs
from mtkd_jax.experiment.progress import RunProgress, StageTimes, log
from mtkd_jax.training import fit as loop

__all__ = [
    "Context",
    "accuracy_eval",
    "fit",
    "log",
    "model_kwargs",
    "optimizer",
    "predict",
    "stacked_accuracy_eval",
    "to_global",
]

_EVALS_PER_RUN = 5  # validation points per training run: learning curves, best checkpoint
# The seed key's streams, folded here only: a new use gets a new number, so no two collide
# (the numbers are those the results in docs/results were measured with).
_KEY_STREAMS = {"teacher init": 1, "student init": 2, "gate init": 5}
_INFER_CHUNK = 4096  # examples per teacher inference call when filling the logit cache


def optimizer(learning_rate: float, total_steps: int, weight_decay: float):
    """AdamW with a cosine decay over `total_steps`."""
    # No tuning of a schedule per row: the same for every student.
    return optax.adamw(optax.cosine_decay_schedule(learning_rate, max(total_steps, 1)),
                       weight_decay=weight_decay)


def to_global(batch: dict, mesh) -> dict:
    """This host's slice of a global batch -> what the data-parallel step takes."""
    if jax.process_count() == 1:
        return batch  # data_parallel_step splits host arrays over the local devices itself
    return parallel.global_batch_from_local(batch, mesh)


def predict(apply_fn: Callable, params, x: np.ndarray) -> np.ndarray:
    """Logits of a jitted apply over `x` in chunks: `[..., N, C]` numpy."""
    outs = [np.asarray(apply_fn(params, x[i:i + _INFER_CHUNK]))
            for i in range(0, len(x), _INFER_CHUNK)]
    return np.concatenate(outs, axis=-2)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


class Context:
    """What every stage of one seed needs: config, data, devices, output paths, and the
    models and compiled steps shared by all seeds."""

    def __init__(self, config, dataset, transfer_x, mesh, run_dir, seed, shared: dict, *,
                 progress: RunProgress | None = None, times: StageTimes | None = None):
        self.config, self.ds, self.transfer_x = config, dataset, transfer_x
        self.mesh, self.run_dir, self.seed = mesh, run_dir, seed
        self.shared = shared
        self.progress = progress or RunProgress(0, enabled=False)
        self.times = times or StageTimes()
        self.key = jax.random.key(seed)
        self.num_classes = dataset.info.num_classes
        self.val_x = jnp.asarray(dataset.validation.x)
        self.val_y = jnp.asarray(dataset.validation.y)

    def key_for(self, purpose: str) -> jax.Array:
        """This seed's key for `purpose` ("teacher init", "student init", "gate init")."""
        return jax.random.fold_in(self.key, _KEY_STREAMS[purpose])

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

    def init(self, name: str, kwargs: dict[str, Any], key, example, *, stacked: bool = False):
        """Initial params of the model `name` from `key` (`[K]` keys with `stacked`: params
        `[K, ...]`) and an example batch; the init is compiled once per run (a fresh
        `jax.jit(model.init)` per training would compile the random generator again)."""
        model, _ = self.model(name, kwargs)

        def build():
            one = lambda k, x: models.init_params(model, k, x)  # noqa: E731
            return jax.jit(jax.vmap(one, (0, None)) if stacked else one)

        fn = self.cached(("init", name, json.dumps(kwargs, sort_keys=True), stacked), build)
        return fn(key, example)

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


def fit(ctx: Context, name: str, state, step, batches_fn, *, steps_per_epoch, epochs,
        eval_fn, fingerprint=None, clock: Callable[[], float] = time.monotonic):
    """`mtkd_jax.training.fit.fit` for the model `name` of this seed: its own key, checkpoints
    under ``checkpoints/seed<s>/<name>`` and TensorBoard events, best by accuracy.

    The latest checkpoint is written every `config.checkpoint_minutes` of `clock` (and every
    `config.checkpoint_every` updates when > 0), at the end and on Ctrl-C, so a stopped run
    loses at most that much of a training; the rerun says where it resumed."""
    total = steps_per_epoch * epochs
    cfg = ctx.config
    log(f"[seed {ctx.seed}] {name}: {epochs} epochs x {steps_per_epoch} steps = {total} updates")
    saved = _latest_step(ctx.checkpoint_dir(name))
    if saved is not None and saved < total:
        log(f"[seed {ctx.seed}] {name}: resuming at update {saved} of {total} (its latest "
            "checkpoint)")
    ctx.progress.start(f"seed {ctx.seed}: {name}")
    writer, log_fn = ctx.log_fn(name)
    try:
        result = loop.fit(
            state,
            step,
            batches_fn,
            num_epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            key=jax.random.fold_in(ctx.key, zlib.crc32(name.encode()) % (2**31)),
            eval_fn=eval_fn,
            eval_every=max(1, math.ceil(total / _EVALS_PER_RUN)),
            checkpoint_dir=ctx.checkpoint_dir(name),
            save_every=cfg.checkpoint_every or total,
            save_every_seconds=60.0 * cfg.checkpoint_minutes or None,
            clock=clock,
            best_metric="accuracy",
            fingerprint=fingerprint,
            progress=ctx.config.progress,
            log_fn=log_fn,
        )
    finally:
        if writer is not None:
            writer.close()
    if result.resumed_from is not None:
        done = ("already finished" if result.resumed_from >= total else
                f"resumed at update {result.resumed_from} of {total}")
        log(f"[seed {ctx.seed}] {name}: restored its checkpoint at update "
            f"{result.resumed_from} of {total} ({done})")
    ctx.progress.finished()
    return result


def _latest_step(checkpoint_dir: str | None) -> int | None:
    """The newest step under ``<checkpoint_dir>/latest`` (a step-named folder), or None."""
    if checkpoint_dir is None or not os.path.isdir(os.path.join(checkpoint_dir, "latest")):
        return None
    steps = [int(n) for n in os.listdir(os.path.join(checkpoint_dir, "latest")) if n.isdigit()]
    return max(steps, default=None)


def accuracy_eval(ctx: Context, apply_fn: Callable) -> Callable:
    """`eval_fn(state)` of one model: validation accuracy and NLL."""
    infer = ctx.cached(("jit", apply_fn), lambda: jax.jit(apply_fn))

    def eval_fn(state):
        z = infer(state.params, ctx.val_x)
        logp = jax.nn.log_softmax(z)
        return {
            "accuracy": jnp.mean(jnp.argmax(z, -1) == ctx.val_y),
            "nll": -jnp.mean(jnp.take_along_axis(logp, ctx.val_y[:, None], -1)),
        }

    return eval_fn


def stacked_accuracy_eval(ctx: Context, apply_fn: Callable) -> Callable:
    """`eval_fn(state)` of K stacked models (params `[K, ...]`): validation accuracy, mean
    over the K and per model."""
    infer = ctx.cached(("vmapped", apply_fn), lambda: jax.jit(jax.vmap(apply_fn, (0, None))))

    def eval_fn(state):
        z = infer(state.params, ctx.val_x)
        acc = jnp.mean(jnp.argmax(z, -1) == ctx.val_y[None], axis=-1)
        return {"accuracy": jnp.mean(acc), "accuracy_per_teacher": acc}

    return eval_fn
