"""Teacher ensembles: stacked pytrees, batched frozen inference, strategy choice, save and load.

* `stacking`: `num_stacked` (K of a stacked pytree), `stack_params`, `unstack_params`;
* `inference`: `make_stacked_apply` (vmap / loop / auto) and `make_heterogeneous_apply`,
  un-jitted `teacher_apply(teacher_params, x) -> logits [K, B, C]`, frozen;
* `autotune`: `time_strategies`, `choose_strategy` (the "auto" choice);
* `io`: `save_teachers`, `load_teachers` (orbax, checked against
  `mtkd_jax.checkpoint.params_fingerprint`).

Training teachers (`TeacherState`, `init_teacher_state`, `init_ensemble`, `set_hyperparams`,
`make_teacher_train_step`, `make_ensemble_train_step`) is re-exported from `_training` until
the engine's one train state and supervised step replace it.
"""

from mtkd_jax.teachers._training import (
    TeacherState,
    init_ensemble,
    init_teacher_state,
    make_ensemble_train_step,
    make_teacher_train_step,
    set_hyperparams,
)
from mtkd_jax.teachers.autotune import choose_strategy, time_strategies
from mtkd_jax.teachers.inference import STRATEGIES, make_heterogeneous_apply, make_stacked_apply
from mtkd_jax.teachers.io import load_teachers, save_teachers
from mtkd_jax.teachers.stacking import num_stacked, stack_params, unstack_params

__all__ = [
    "STRATEGIES",
    "TeacherState",
    "choose_strategy",
    "init_ensemble",
    "init_teacher_state",
    "load_teachers",
    "make_ensemble_train_step",
    "make_heterogeneous_apply",
    "make_stacked_apply",
    "make_teacher_train_step",
    "num_stacked",
    "save_teachers",
    "set_hyperparams",
    "stack_params",
    "time_strategies",
    "unstack_params",
]
