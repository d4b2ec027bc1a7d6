r"""Parameters sharded over a 2-D `("data", "model")` mesh: teachers and students too big
for one device.

Today's `mtkd_jax.parallel` replicates every parameter and splits the batch. Here the
layout of the parameters is an argument too, given by plain rules (`rules.py`) and applied
by `jax.jit`'s `in_shardings` / `out_shardings` (`sharded.py`); the step functions are the
same::

    mesh = make_mesh(2, 4)                                     # data x model
    teachers = tree_shardings(teacher_params, mesh, stacked(fsdp()))   # or per_teacher()
    student = state_shardings(state, mesh, replicated())               # or fsdp(), ...
    step = sharded_step(make_distill_step(...), mesh, state_shardings=student,
                        teacher_shardings=teachers)
    state, metrics = step(state, batch, key, teacher_params=teacher_params)

Checkpoints: `Checkpointer.save(step, state)` writes a sharded state as it is;
`Checkpointer.restore(abstract_like(state, shardings))` reads it into any other layout
(another mesh shape, one device).
"""

from mtkd_jax.sharding.rules import (
    Rule,
    fsdp,
    make_mesh,
    per_teacher,
    replicated,
    stacked,
    state_shardings,
    tensor_parallel,
    tree_shardings,
)
from mtkd_jax.sharding.sharded import (
    abstract_like,
    mesh_of,
    place,
    sharded_eval_step,
    sharded_step,
    sharded_teacher_apply,
)

__all__ = [
    "Rule",
    "make_mesh",
    "replicated",
    "fsdp",
    "tensor_parallel",
    "stacked",
    "per_teacher",
    "tree_shardings",
    "state_shardings",
    "sharded_step",
    "sharded_eval_step",
    "sharded_teacher_apply",
    "place",
    "abstract_like",
    "mesh_of",
]
