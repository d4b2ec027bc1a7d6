"""mtkd_jax: multi-teacher knowledge distillation for JAX/Flax.

One name per concept here; everything else lives in its module (see docs/architecture.md for
the layers, bottom up):

* `mtkd_jax.core`: the functional core: `softmax_t`, `pairwise_divergence`, the per-example
  losses `soft_kl`, `soft_mse`, `cross_entropy`, `distillation_loss`, `per_teacher_soft_kl`
  (teacher axis first, `[K, ..., C]`);
* `mtkd_jax.weighting`: teacher weights, one protocol and one registry (`WEIGHTINGS`,
  `get_weighting`, `register_weighting`);
* `mtkd_jax.objective`: targets (`fuse_targets`, `leave_one_out_targets`, `distill_targets`)
  and the batch objective, whole or chunked (`mean_distillation_loss`);
* `mtkd_jax.models`: the model protocol (`Model`: `as_model`, `linen_model`, `nnx_split`)
  and, apart, the reference models (`mtkd_jax.models.zoo`);
* `mtkd_jax.training`: `TrainState`, the step factories (`make_supervised_step`,
  `make_distill_step`, `make_codistill_step`, `stacked_step`), `make_eval_step` and
  `evaluate`, the kill-safe `fit` and its `Checkpointer`;
* `mtkd_jax.parallel`: one mesh builder (`make_mesh`), `place`, `data_parallel_step`,
  `shard_batch`, sharded parameters and several hosts;
* `mtkd_jax.teachers`: frozen ensembles (`make_stacked_apply`, `make_heterogeneous_apply`),
  orbax save/load;
* `mtkd_jax.metrics`, `mtkd_jax.data`, `mtkd_jax.cache`, `mtkd_jax.experiment`.

Every `make_*` factory returns an un-jitted function. `mtkd_jax.data` (TFDS and offline
datasets), `mtkd_jax.experiment` and `mtkd_jax.cache` are imported on first access, since TFDS
is slow to import and the functional core does not need them.
"""

import importlib

from mtkd_jax import (  # noqa: F401 (the layers, as attributes of the namespace)
    core,
    metrics,
    models,
    objective,
    parallel,
    teachers,
    training,
    weighting,
)
from mtkd_jax.core.divergence import pairwise_divergence, softmax_t
from mtkd_jax.core.losses import (
    cross_entropy,
    distillation_loss,
    per_teacher_soft_kl,
    soft_kl,
    soft_mse,
)
from mtkd_jax.core.precision import Policy
from mtkd_jax.models import Model, as_model, linen_model, nnx_split
from mtkd_jax.objective.loss import mean_distillation_loss
from mtkd_jax.objective.targets import distill_targets, fuse_targets, leave_one_out_targets
from mtkd_jax.parallel import data_parallel_step, make_mesh, place, shard_batch
from mtkd_jax.teachers import (
    load_teachers,
    make_heterogeneous_apply,
    make_stacked_apply,
    save_teachers,
    stack_params,
)
from mtkd_jax.training.checkpoint import Checkpointer
from mtkd_jax.training.evaluation import evaluate, make_eval_step
from mtkd_jax.training.fit import FitResult, NonFiniteLossError, fit
from mtkd_jax.training.state import (
    TrainState,
    init_stacked_train_state,
    init_train_state,
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
    # functional core: divergences, per-example losses, targets, the batch objective
    "softmax_t",
    "pairwise_divergence",
    "soft_kl",
    "soft_mse",
    "cross_entropy",
    "distillation_loss",
    "per_teacher_soft_kl",
    "mean_distillation_loss",
    "fuse_targets",
    "leave_one_out_targets",
    "distill_targets",
    # teacher weights
    "WEIGHTINGS",
    "get_weighting",
    "register_weighting",
    # models
    "Model",
    "as_model",
    "linen_model",
    "nnx_split",
    "Policy",
    # training
    "TrainState",
    "init_train_state",
    "init_stacked_train_state",
    "variables_of",
    "make_supervised_step",
    "make_distill_step",
    "make_codistill_step",
    "stacked_step",
    "make_eval_step",
    "evaluate",
    "fit",
    "FitResult",
    "NonFiniteLossError",
    "Checkpointer",
    # devices
    "make_mesh",
    "place",
    "shard_batch",
    "data_parallel_step",
    # teachers
    "make_stacked_apply",
    "make_heterogeneous_apply",
    "stack_params",
    "save_teachers",
    "load_teachers",
]
