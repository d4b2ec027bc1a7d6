"""Teacher ensembles: stacked pytrees, batched frozen inference, strategy choice, save and load.

* `stacking`: `num_stacked` (K of a stacked pytree), `stack_params`, `unstack_params`;
* `inference`: `make_stacked_apply` (vmap / loop / auto) and `make_heterogeneous_apply`,
  un-jitted `teacher_apply(teacher_params, x) -> logits [K, B, C]`, frozen;
* `autotune`: `time_strategies`, `choose_strategy` (the "auto" choice);
* `io`: `save_teachers`, `load_teachers` (orbax, checked against
  `mtkd_jax.training.checkpoint.params_fingerprint`);
* `own_checkpoints`: `load_orbax_teachers`, teachers saved by your own orbax code
  (StandardCheckpointer or CheckpointManager; Linen or NNX; K of them stacked);
* `published`: `load_published_teachers`, published Llama / Qwen / Gemma checkpoints
  (safetensors) as one ensemble, stacked when they share a config.

A teacher is a plain `apply_fn(params, x)` or a `mtkd_jax.models.Model` (Linen, NNX), run
frozen in evaluation mode on its variables (`mtkd_jax.variables_of`).

Teachers are trained like any model: `mtkd_jax.training.steps.make_supervised_step`, K of one
architecture at once with `mtkd_jax.training.steps.stacked_step` over a stacked
`mtkd_jax.training.state.TrainState`.
"""

from mtkd_jax.models.stacking import num_stacked, stack_params, unstack_params
from mtkd_jax.teachers.autotune import choose_strategy, time_strategies
from mtkd_jax.teachers.inference import STRATEGIES, make_heterogeneous_apply, make_stacked_apply
from mtkd_jax.teachers.io import load_teachers, save_teachers
from mtkd_jax.teachers.own_checkpoints import load_orbax_teachers
from mtkd_jax.teachers.published import PublishedTeachers, load_published_teachers

__all__ = [
    "STRATEGIES",
    "choose_strategy",
    "load_orbax_teachers",
    "load_published_teachers",
    "PublishedTeachers",
    "load_teachers",
    "make_heterogeneous_apply",
    "make_stacked_apply",
    "num_stacked",
    "save_teachers",
    "stack_params",
    "time_strategies",
    "unstack_params",
]
