"""Devices: one step on 1 device, D devices, several hosts, parameters sharded or replicated.

* `data_parallel`: data parallelism over a one-axis `("data",)` mesh (`data_mesh`,
  `replicate`, `shard_batch`, `global_batch_from_local`, `data_parallel_step`); parameters
  replicated, the batch split over the devices.
* `rules` and `sharded`: parameters sharded over a 2-D `("data", "model")` mesh, teachers and
  students too big for one device. The layout of the parameters is an argument too, given by
  plain rules and applied by `jax.jit`'s `in_shardings` / `out_shardings`; the step functions
  are the same::

    mesh = make_mesh(2, 4)                                     # data x model
    teachers = tree_shardings(teacher_params, mesh, stacked(fsdp()))   # or per_teacher()
    student = state_shardings(state, mesh, replicated())               # or fsdp(), ...
    step = sharded_step(make_distill_step(...), mesh, state_shardings=student,
                        teacher_shardings=teachers)
    state, metrics = step(state, batch, key, teacher_params=teacher_params)

  Checkpoints: `Checkpointer.save(step, state)` writes a sharded state as it is;
  `Checkpointer.restore(abstract_like(state, shardings))` reads it into any other layout
  (another mesh shape, one device).
* `hosts` and `initialize`: several processes (hosts) through JAX's own distributed runtime.
  A multi-host run is P copies of the same program, one per host. Each calls
  `initialize_distributed` before any other JAX call, then builds the same mesh over the
  devices of all processes (`data_mesh()`), reads only its own rows of each global batch
  (`mtkd_jax.data.batches`, which defaults to this process's `process_index` /
  `process_count`), turns them into global arrays (`global_batches`) and runs the same
  data-parallel step. Only the main process (`is_main_process`) writes logs and reports;
  checkpoints go through orbax, which coordinates the processes itself. Where the coordinator
  address, the number of processes and this process's id come from is said in
  `initialize_distributed`.
"""

from mtkd_jax.parallel.data_parallel import (
    BATCH_AXES,
    batch_specs,
    data_mesh,
    data_parallel_step,
    global_batch_from_local,
    replicate,
    shard_batch,
)
from mtkd_jax.parallel.hosts import (
    ProcessInfo,
    barrier,
    broadcast_from_main,
    global_batches,
    is_main_process,
    process_info,
    process_local,
)
from mtkd_jax.parallel.initialize import (
    ENV_COORDINATOR,
    ENV_DISTRIBUTED,
    ENV_LOCAL_DEVICE_IDS,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    distributed_requested,
    initialize_distributed,
)
from mtkd_jax.parallel.rules import (
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
from mtkd_jax.parallel.sharded import (
    abstract_like,
    mesh_of,
    place,
    sharded_eval_step,
    sharded_step,
    sharded_teacher_apply,
)

__all__ = [
    "BATCH_AXES",
    "batch_specs",
    "data_mesh",
    "data_parallel_step",
    "global_batch_from_local",
    "replicate",
    "shard_batch",
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
    "ENV_COORDINATOR",
    "ENV_DISTRIBUTED",
    "ENV_LOCAL_DEVICE_IDS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ProcessInfo",
    "barrier",
    "broadcast_from_main",
    "distributed_requested",
    "global_batches",
    "initialize_distributed",
    "is_main_process",
    "process_info",
    "process_local",
]
