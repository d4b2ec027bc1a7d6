"""mtkd_jax: multi-teacher knowledge distillation for JAX/Flax.

The functional core (pure functions over arrays, teacher axis first `[K, ..., C]`):

* `softmax_t`, `pairwise_divergence`: teacher predictions and their differences;
* `mtkd_jax.weighting`: teacher weights, one protocol and one registry (`WEIGHTINGS`);
* `fuse_targets`, `leave_one_out_targets`, `fuse_logits`, `distill_targets`: targets;
* `mtkd_jax.core.losses`: per-example soft losses (`soft_kl`, `soft_mse`), CE, their mix and
  its masked batch mean.

The engine built on it (see docs/architecture.md):

* `mtkd_jax.training.state.TrainState`, one state for students and teachers (one or K stacked),
  with the model's non-parameter state (BatchNorm statistics);
* `mtkd_jax.training.steps`: supervised / distill / codistill step factories, `stacked_step` for K
  models at once; `mtkd_jax.training.evaluation`: eval step and `evaluate`;
* `mtkd_jax.teachers`: stacked (vmap/loop/auto) and heterogeneous frozen ensembles, orbax
  save/load; `mtkd_jax.parallel`: the same steps data-parallel over a `("data",)` mesh;
* `mtkd_jax.training.fit.fit` with `mtkd_jax.training.checkpoint.Checkpointer`: kill-safe training;
* `mtkd_jax.models`: the model protocol (`Model`: `as_model`, `linen_model`, `nnx_split`)
  and small XLA-friendly reference models in Linen and NNX; `mtkd_jax.core.precision`: the
  mixed-precision `Policy`.
* `mtkd_jax.core.class_sets`: teachers that know different classes, fused in a global class space;
  `mtkd_jax.parallel`: parameters sharded over a 2-D mesh (FSDP, tensor-parallel rules);
  `mtkd_jax.metrics.tokens`: token-level metrics over valid (unpadded) positions.

Every `make_*` factory returns an un-jitted function. `mtkd_jax.data` (TFDS and offline
datasets), `mtkd_jax.experiment`, `mtkd_jax.cache` and `mtkd_jax.parallel` are imported on
first access, since TFDS is slow to import and the functional core does not need them.
"""

import importlib

from mtkd_jax import (
    core,
    metrics,
    models,
    objective,
    parallel,
    teachers,
    training,
    weighting,
)
from mtkd_jax.core.divergence import DIVERGENCES, log_softmax_t, pairwise_divergence, softmax_t
from mtkd_jax.core.losses import (
    SOFT_LOSSES,
    cross_entropy,
    distillation_loss,
    mean_distillation_loss,
    per_teacher_soft_kl,
    soft_kl,
    soft_mse,
)
from mtkd_jax.core.precision import Policy
from mtkd_jax.core.reduce import global_mean
from mtkd_jax.models import (
    MODELS,
    NNX_MODELS,
    Model,
    apply_fn_of,
    as_model,
    init_params,
    linen_model,
    make_model,
    model_variables,
    nnx_apply_fn,
    nnx_split,
)
from mtkd_jax.objective.targets import (
    DistillTargets,
    distill_targets,
    fuse_logits,
    fuse_targets,
    leave_one_out_targets,
)
from mtkd_jax.parallel import data_mesh, data_parallel_step, replicate, shard_batch
from mtkd_jax.teachers import (
    choose_strategy,
    load_orbax_teachers,
    load_teachers,
    make_heterogeneous_apply,
    make_stacked_apply,
    save_teachers,
    stack_params,
    unstack_params,
)
from mtkd_jax.training.batch import check_batch
from mtkd_jax.training.checkpoint import Checkpointer, params_fingerprint
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.fit import FitResult, NonFiniteLossError, fit
from mtkd_jax.training.state import (
    TrainState,
    init_stacked_train_state,
    init_train_state,
    set_hyperparams,
    variables_of,
)
from mtkd_jax.training.steps import (
    make_codistill_step,
    make_distill_step,
    make_supervised_step,
    stacked_step,
)
from mtkd_jax.weighting import WEIGHTINGS, get_weighting, register_weighting

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("data", "experiment", "cache")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"mtkd_jax.{name}")
    raise AttributeError(f"module 'mtkd_jax' has no attribute {name!r}")


__all__ = [
    "DIVERGENCES",
    "MODELS",
    "NNX_MODELS",
    "SOFT_LOSSES",
    "WEIGHTINGS",
    "Checkpointer",
    "DistillTargets",
    "FitResult",
    "Model",
    "NonFiniteLossError",
    "Policy",
    "TrainState",
    "apply_fn_of",
    "as_model",
    "check_batch",
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
    "get_weighting",
    "global_mean",
    "init_params",
    "init_stacked_train_state",
    "init_train_state",
    "leave_one_out_targets",
    "linen_model",
    "load_orbax_teachers",
    "load_teachers",
    "log_softmax_t",
    "make_codistill_step",
    "make_distill_step",
    "make_eval_step",
    "make_heterogeneous_apply",
    "make_model",
    "make_stacked_apply",
    "make_supervised_step",
    "mean_distillation_loss",
    "metrics",
    "model_variables",
    "models",
    "nnx_apply_fn",
    "nnx_split",
    "pairwise_divergence",
    "parallel",
    "params_fingerprint",
    "per_teacher_soft_kl",
    "register_weighting",
    "replicate",
    "save_teachers",
    "set_hyperparams",
    "shard_batch",
    "soft_kl",
    "soft_mse",
    "softmax_t",
    "stack_params",
    "stacked_step",
    "teachers",
    "unstack_params",
    "variables_of",
    "weighting",
    "core",
    "objective",
    "training",
]
