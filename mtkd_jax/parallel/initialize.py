"""Joining a multi-host job: `initialize_distributed` and where its settings come from."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mtkd_jax.core import checks as _checks
from mtkd_jax.parallel.hosts import ProcessInfo, process_info

__all__ = [
    "ENV_COORDINATOR",
    "ENV_DISTRIBUTED",
    "ENV_LOCAL_DEVICE_IDS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "distributed_requested",
    "initialize_distributed",
]

ENV_COORDINATOR = "MTKD_COORDINATOR"
ENV_NUM_PROCESSES = "MTKD_NUM_PROCESSES"
ENV_PROCESS_ID = "MTKD_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MTKD_LOCAL_DEVICE_IDS"
ENV_DISTRIBUTED = "MTKD_DISTRIBUTED"

_CPU_COLLECTIVES = ("gloo", "mpi", None)
_TRUE = ("1", "true", "yes", "on", "auto")
_FALSE = ("", "0", "false", "no", "off")
# host:port, the host a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):\d{1,5}")
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_HOW_TO = (
    f"set {ENV_COORDINATOR}=host:port (process 0's address and a free port), "
    f"{ENV_NUM_PROCESSES}=P and {ENV_PROCESS_ID}=0..P-1 in each process (or pass "
    "coordinator_address=, num_processes=, process_id=), or launch under Slurm, Open MPI, "
    "Kubernetes or Cloud TPU, which JAX detects by itself"
)


def distributed_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for a multi-process run.

    True when `MTKD_DISTRIBUTED` is 1/true/yes/on/auto (use JAX's cluster detection, e.g. in
    a Slurm job) or when `MTKD_COORDINATOR` or `MTKD_NUM_PROCESSES` is set. Entry points call
    `initialize_distributed()` when this or their own `--distributed` flag is set.

    Args:
      environ: the environment to read (default `os.environ`).

    Raises:
      ValueError: `MTKD_DISTRIBUTED` holds something other than a yes/no word.

    Example:
      >>> from mtkd_jax.parallel import distributed_requested
      >>> distributed_requested({}), distributed_requested({"MTKD_DISTRIBUTED": "1"})
      (False, True)
      >>> distributed_requested({"MTKD_COORDINATOR": "10.0.0.1:1234"})
      True
    """
    environ = os.environ if environ is None else environ
    flag = environ.get(ENV_DISTRIBUTED, "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise ValueError(
            f"`{ENV_DISTRIBUTED}` must be one of {_TRUE} (use JAX's cluster detection) or "
            f"{_FALSE[1:]}, got {environ[ENV_DISTRIBUTED]!r}."
        )
    return flag in _TRUE or bool(environ.get(ENV_COORDINATOR) or environ.get(ENV_NUM_PROCESSES))


def _int_setting(value, name: str, env: str, *, low: int) -> int | None:
    if value is None:
        return None
    where = f"`{name}` (or ${env})"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {value!r}.")
    return int(value)


def _address(value, name: str, env: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(
            f"`{name}` (or ${env}) must be 'host:port' (e.g. '10.0.0.1:1234'), got {value!r}."
        )
    return value


def _device_ids(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, int | np.integer | str):
        value = [value]
    try:
        ids = [int(v) for v in value]
    except (TypeError, ValueError):
        ids = None
    if not ids or min(ids) < 0:
        raise ValueError(
            f"`local_device_ids` (or ${ENV_LOCAL_DEVICE_IDS}, comma separated) must be "
            f"non-negative integers, got {value!r}."
        )
    return ids


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    coordinator_bind_address: str | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
    shutdown_timeout_seconds: int = 300,
    environ: Mapping[str, str] | None = None,
) -> ProcessInfo:
    """Start JAX's distributed runtime for this process: call it first, before any JAX work.

    Each setting comes from its keyword argument, else its environment variable
    (`MTKD_COORDINATOR`, `MTKD_NUM_PROCESSES`, `MTKD_PROCESS_ID`, `MTKD_LOCAL_DEVICE_IDS`),
    else JAX's cluster detection (Slurm, Open MPI, Kubernetes, Cloud TPU). A run of one
    process without a coordinator starts nothing. When JAX's runtime already runs, the
    current `ProcessInfo` is returned.

    Args:
      coordinator_address: `"host:port"` of process 0; every process passes the same.
      num_processes: P.
      process_id: this process's id in `[0, P)`.
      local_device_ids: the local accelerators this process may use (GPU/TPU).
      cpu_collectives: how CPU devices of different processes exchange data: `"gloo"`
        (TCP, works anywhere), `"mpi"`, or None to keep JAX's
        `jax_cpu_collectives_implementation` setting. Only matters on the CPU backend.
      coordinator_bind_address: where process 0 listens. Default: the coordinator's own
        address when it is a loopback one (a local run stays on 127.0.0.1), else all
        interfaces on its port (JAX's default).
      initialization_timeout: seconds to wait for all P processes to connect.
      heartbeat_timeout_seconds: a process silent this long counts as dead, and all others
        then abort with an error naming it. This bounds how long a job can hang on a
        killed process.
      shutdown_timeout_seconds: at exit, how long a process waits for the others.
      environ: the environment to read (default `os.environ`).

    Returns:
      This process's `ProcessInfo`.

    Raises:
      ValueError: a malformed setting (naming the argument and its variable), a process id
        outside `[0, P)`, or several processes asked for but no coordinator found.
      RuntimeError: JAX's backend was already used by this process (then it is too late).

    Example:
      >>> from mtkd_jax.parallel import initialize_distributed
      >>> info = initialize_distributed(num_processes=1, environ={})  # nothing to start
      >>> info.process_count, info.initialized
      (1, False)
    """
    environ = os.environ if environ is None else environ
    if cpu_collectives not in _CPU_COLLECTIVES:
        raise ValueError(
            f"`cpu_collectives` must be one of {_CPU_COLLECTIVES}, got {cpu_collectives!r}."
        )
    for value, name in (
        (initialization_timeout, "initialization_timeout"),
        (heartbeat_timeout_seconds, "heartbeat_timeout_seconds"),
        (shutdown_timeout_seconds, "shutdown_timeout_seconds"),
    ):
        _checks.check_int(value, name)
    coordinator = _address(
        coordinator_address or environ.get(ENV_COORDINATOR) or None,
        "coordinator_address",
        ENV_COORDINATOR,
    )
    count = _int_setting(
        num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES) or None,
        "num_processes",
        ENV_NUM_PROCESSES,
        low=1,
    )
    index = _int_setting(
        process_id if process_id is not None else environ.get(ENV_PROCESS_ID) or None,
        "process_id",
        ENV_PROCESS_ID,
        low=0,
    )
    if count is not None and index is not None and index >= count:
        raise ValueError(
            f"`process_id` (or ${ENV_PROCESS_ID}) must be in [0, {count}) for num_processes="
            f"{count}, got {index}."
        )
    device_ids = _device_ids(
        local_device_ids if local_device_ids is not None else environ.get(ENV_LOCAL_DEVICE_IDS)
    )

    if jax.distributed.is_initialized():
        info = process_info()
        for want, have, name in (
            (count, info.process_count, "num_processes"),
            (index, info.process_index, "process_id"),
        ):
            if want is not None and want != have:
                raise ValueError(
                    f"JAX's distributed runtime already runs with {name}={have}, not {want}."
                )
        return info
    if count == 1 and coordinator is None:
        return process_info()

    if coordinator_bind_address is None and coordinator is not None:
        host = coordinator.rsplit(":", 1)[0]
        if host in _LOOPBACK:
            # Reachable from this machine only anyway: do not listen on every interface.
            coordinator_bind_address = coordinator
    if cpu_collectives is not None:
        # Read when the CPU backend is created, i.e. after `initialize`: set it first.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=count,
            process_id=index,
            local_device_ids=device_ids,
            coordinator_bind_address=coordinator_bind_address,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            shutdown_timeout_seconds=shutdown_timeout_seconds,
        )
    except ValueError as error:
        if coordinator is None and "coordinator_address" in str(error):
            raise ValueError(
                "initialize_distributed: no coordinator address given and JAX detected no "
                f"cluster; {_HOW_TO}."
            ) from error
        raise
    except RuntimeError as error:
        if "before any JAX calls" in str(error):
            raise RuntimeError(
                "initialize_distributed must run before anything that starts JAX's backend "
                "(jax.devices(), a computation, device_put, a jitted call): call it first "
                "in main()."
            ) from error
        raise
    return process_info()
