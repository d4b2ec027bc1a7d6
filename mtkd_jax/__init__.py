"""mtkd_jax: multi-teacher knowledge distillation for JAX/Flax.

The functional core (pure functions over arrays, teacher axis first `[K, ..., C]`):

* `softmax_t`, `pairwise_divergence`: teacher predictions and their differences;
* `mtkd_jax.weighting`: teacher weights (uniform, static, from scores, confidence, entropy,
  agreement);
* `fuse_targets`, `leave_one_out_targets`, `fuse_logits`: distillation targets;
* `mtkd_jax.losses`: per-example soft losses (`soft_kl`, `soft_mse`), CE, their mix.

The engine built on it:

* `mtkd_jax.teachers`: stacked (vmap/loop/auto) and heterogeneous frozen teacher ensembles,
  K teachers trained at once, orbax save/load;
* `mtkd_jax.train`: distill / codistill / supervised / eval steps; `mtkd_jax.parallel`: the same
  steps data-parallel over a `("data",)` mesh; `mtkd_jax.metrics`;
* `mtkd_jax.loop.fit` with `mtkd_jax.checkpoint.Checkpointer`: kill-safe training;
* `mtkd_jax.models`: small XLA-friendly reference models.

`mtkd_jax.data` (TFDS and offline datasets) and `mtkd_jax.experiment` are imported on first
access, since TFDS is slow to import and the functional core does not need it.
"""

import importlib

from mtkd_jax import (
    checkpoint,
    losses,
    metrics,
    models,
    parallel,
    teachers,
    train,
    weighting,
)
from mtkd_jax.checkpoint import Checkpointer, params_fingerprint
from mtkd_jax.divergence import DIVERGENCES, log_softmax_t, pairwise_divergence, softmax_t
from mtkd_jax.loop import FitResult, NonFiniteLossError, fit
from mtkd_jax.losses import (
    cross_entropy,
    distillation_loss,
    per_teacher_soft_kl,
    soft_kl,
    soft_mse,
)
from mtkd_jax.models import apply_fn_of, init_params, make_model, nnx_apply_fn
from mtkd_jax.parallel import data_mesh, data_parallel_step, replicate, shard_batch
from mtkd_jax.targets import fuse_logits, fuse_targets, leave_one_out_targets
from mtkd_jax.teachers import (
    choose_strategy,
    init_ensemble,
    load_teachers,
    make_ensemble_train_step,
    make_heterogeneous_apply,
    make_stacked_apply,
    make_teacher_train_step,
    save_teachers,
    stack_params,
    unstack_params,
)
from mtkd_jax.train import (
    TrainState,
    check_batch,
    distill_targets,
    evaluate,
    init_stacked_train_state,
    init_train_state,
    make_codistill_step,
    make_distill_step,
    make_eval_step,
    make_supervised_step,
)

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("data", "experiment", "cache", "distributed")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"mtkd_jax.{name}")
    raise AttributeError(f"module 'mtkd_jax' has no attribute {name!r}")


__all__ = [
    "DIVERGENCES",
    "Checkpointer",
    "FitResult",
    "NonFiniteLossError",
    "TrainState",
    "apply_fn_of",
    "check_batch",
    "checkpoint",
    "choose_strategy",
    "cross_entropy",
    "data_mesh",
    "data_parallel_step",
    "distill_targets",
    "distillation_loss",
    "evaluate",
    "fit",
    "fuse_logits",
    "fuse_targets",
    "init_ensemble",
    "init_params",
    "init_stacked_train_state",
    "init_train_state",
    "leave_one_out_targets",
    "load_teachers",
    "log_softmax_t",
    "losses",
    "make_codistill_step",
    "make_distill_step",
    "make_ensemble_train_step",
    "make_eval_step",
    "make_heterogeneous_apply",
    "make_model",
    "make_stacked_apply",
    "make_supervised_step",
    "make_teacher_train_step",
    "metrics",
    "models",
    "nnx_apply_fn",
    "pairwise_divergence",
    "parallel",
    "params_fingerprint",
    "per_teacher_soft_kl",
    "replicate",
    "save_teachers",
    "shard_batch",
    "soft_kl",
    "soft_mse",
    "softmax_t",
    "stack_params",
    "teachers",
    "train",
    "unstack_params",
    "weighting",
]
