"""Several processes (hosts) through JAX's own distributed runtime; no communication layer here.

A multi-host run is P copies of the same program, one per host (or per process on one
machine). Each calls `initialize_distributed` before any other JAX call, then builds the same
mesh over the devices of all processes (`mtkd_jax.parallel.data_mesh()`), reads only its own
rows of each global batch (`mtkd_jax.data.batches`, which defaults to this process's
`process_index` / `process_count`), turns them into global arrays (`global_batches`) and runs
the same data-parallel step (`mtkd_jax.parallel.data_parallel_step`). Only the main process
(`is_main_process`) writes logs and reports; checkpoints go through orbax, which coordinates
the processes itself (`mtkd_jax.loop.fit(checkpoint_dir=...)`).

Where the coordinator address, the number of processes and this process's id come from, in
order: the keyword arguments; the environment variables `MTKD_COORDINATOR` (`host:port` of
process 0), `MTKD_NUM_PROCESSES`, `MTKD_PROCESS_ID`, `MTKD_LOCAL_DEVICE_IDS` (comma
separated); JAX's own detection of Slurm, Open MPI, Kubernetes and Cloud TPU (and its
`JAX_COORDINATOR_ADDRESS`). A process that dies is noticed by the others after at most
`heartbeat_timeout_seconds`; they then abort with "Terminating process because the JAX
distributed service detected fatal errors", so a job never hangs on a dead peer.
"""

from mtkd_jax.distributed.hosts import (
    ProcessInfo,
    barrier,
    broadcast_from_main,
    global_batches,
    is_main_process,
    process_info,
    process_local,
)
from mtkd_jax.distributed.setup import (
    ENV_COORDINATOR,
    ENV_DISTRIBUTED,
    ENV_LOCAL_DEVICE_IDS,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    distributed_requested,
    initialize_distributed,
)

__all__ = [
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
