"""Several processes on this machine train as one job through JAX's distributed runtime.

Each test starts P copies of `multihost_worker.py` (1 or 2 fake CPU devices each, CPU
collectives over gloo, the coordinator on 127.0.0.1 only) and compares what they trained with
the same training run in this process on a mesh of as many devices. Children run in their own
process groups, are waited for with deadlines and are killed when a test fails or times out.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multihost_worker
import numpy as np
import pytest

from mtkd_jax import parallel
from mtkd_jax.cache import open_cache
from mtkd_jax.parallel import data_mesh, shard_batch

WORKER = Path(__file__).with_name("multihost_worker.py")
TOTAL_DEVICES = 4  # 2 processes x 2 devices, or 4 x 1: the reference runs on 4 devices
HEARTBEAT = 10  # seconds after which the others count a silent process as dead
KILL_HEARTBEAT = 5  # the same in the job whose process is killed, to keep the test short
RUN_TIMEOUT = 150  # seconds for one job (start, compile, 12 steps, exit) on a busy 2-core CPU
# The others' abort on a dead peer: at most the heartbeat timeout, plus slack for a busy CPU.
FAIL_FAST = KILL_HEARTBEAT + 20
ABORT = re.compile(r"JAX distributed service detected fatal errors")
# Environment that would make JAX detect a cluster or route local RPCs through a proxy.
_FOREIGN_ENV = re.compile(r"(SLURM_|OMPI_|PMI_|KUBERNETES_|TPU_|JAX_|XLA_|MTKD_)|.*_proxy$", re.I)


def _cannot_run_here() -> str | None:
    """Why the processes could not talk over gloo on 127.0.0.1 only, or None when they can."""
    try:
        from jax._src.lib import _jax

        _jax.make_gloo_tcp_collectives  # noqa: B018
    except (ImportError, AttributeError) as error:
        return f"this jaxlib cannot run CPU collectives across processes (no gloo): {error!r}"
    # JAX builds gloo's TCP transport without an address, so gloo listens on the address this
    # machine's host name resolves to: the processes must stay on the loopback interface.
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError as error:
        return f"the host name does not resolve, so gloo has no address to listen on: {error}"
    if not address.startswith("127."):
        return (
            f"gloo would listen on {address} (what the host name resolves to), not on the "
            "loopback interface that these tests keep to"
        )
    return None


needs_gloo = pytest.mark.skipif(_cannot_run_here() is not None, reason=str(_cannot_run_here()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "1", **extra})
    return env


def _quiet(text: str, lines: int = 30) -> str:
    keep = [ln for ln in text.splitlines() if not ln.startswith(("[Gloo]", "I0", "I1"))]
    return "\n".join(keep[-lines:])


class Job:
    """P worker processes of one distributed run, each in its own process group."""

    def __init__(
        self, tmp_path, name, *, processes, devices, jax_cache, heartbeat=HEARTBEAT, **worker_args
    ):
        self.dir = tmp_path / name
        self.dir.mkdir()
        port = _free_port()
        args = [f"--{k.replace('_', '-')}={v}" for k, v in worker_args.items()]
        args.append(f"--heartbeat={heartbeat}")
        self.procs = []
        for p in range(processes):
            env = _child_env(
                {
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                    "MTKD_COORDINATOR": f"127.0.0.1:{port}",
                    "MTKD_NUM_PROCESSES": str(processes),
                    "MTKD_PROCESS_ID": str(p),
                    # Later jobs of the module load the step from here instead of compiling.
                    "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                }
            )
            with open(self.dir / f"{p}.out", "w") as out, open(self.dir / f"{p}.err", "w") as err:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-u", str(WORKER), f"--out={self.dir}", *args],
                        env=env,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                )

    def stdout(self, p) -> str:
        return (self.dir / f"{p}.out").read_text()

    def stderr(self, p) -> str:
        return (self.dir / f"{p}.err").read_text()

    def logs(self) -> str:
        return "\n".join(
            f"--- process {p} (rc {proc.poll()}):\n{_quiet(self.stdout(p) + self.stderr(p))}"
            for p, proc in enumerate(self.procs)
        )

    def kill(self, p) -> None:
        if self.procs[p].poll() is None:
            try:
                os.killpg(self.procs[p].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.procs[p].wait()

    def kill_all(self) -> None:
        for p in range(len(self.procs)):
            self.kill(p)

    def wait(self, timeout, procs=None) -> list[int]:
        """Return codes of `procs` (default all); kill everything and fail past `timeout`."""
        deadline = time.monotonic() + timeout
        procs = range(len(self.procs)) if procs is None else procs
        codes = []
        for p in procs:
            try:
                codes.append(self.procs[p].wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"process {p} still ran after {timeout} s:\n{self.logs()}")
        return codes

    def results(self) -> list[dict]:
        return [
            json.loads((self.dir / f"process{p}.json").read_text()) for p in range(len(self.procs))
        ]


@pytest.fixture
def start_job(tmp_path_factory, tmp_path):
    jobs = []
    jax_cache = tmp_path_factory.getbasetemp() / "multihost-jax-cache"

    def start(name, **kwargs):
        jobs.append(Job(tmp_path, name, jax_cache=jax_cache, **kwargs))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill_all()


@pytest.fixture(scope="module")
def reference():
    """The single-process run on 4 devices: final params and the global batches' indices."""
    mesh = data_mesh(jax.devices()[:TOTAL_DEVICES])
    result, loaded = multihost_worker.train(mesh, process_index=0, process_count=1)
    return multihost_worker.host_params(result.state.params), loaded


def _check_matches_reference(results, reference, *, start_step=0, params_key="params", loaded=True):
    params, global_loaded = reference
    count = len(results)
    for p, record in enumerate(results):
        info = record["info"]
        assert (info["process_index"], info["process_count"]) == (p, count)
        assert info["device_count"] == TOTAL_DEVICES
        assert info["local_device_count"] == TOTAL_DEVICES // count
        assert info["initialized"]
        assert record["main"] == (p == 0)
        assert record["step"] == multihost_worker.EPOCHS * multihost_worker.STEPS_PER_EPOCH
        # Each process read only its rows of each global batch (from the resume point on).
        local = multihost_worker.BATCH // count
        expected = [g[p * local : (p + 1) * local] for g in global_loaded[start_step:]]
        if loaded:
            assert record["loaded"] == expected
        jax.tree.map(
            lambda got, want, p=p: np.testing.assert_allclose(
                np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=f"process {p}"
            ),
            record[params_key],
            params,
        )
        # The replicated parameters are the same bits on every process.
        assert record[params_key] == results[0][params_key]


@needs_gloo
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_two_processes_train_like_one(start_job, reference, tmp_path):
    cache_dir = tmp_path / "teacher-cache"
    # "auto-split": strategy "auto" with timings that disagree (process 0 finds vmap faster,
    # process 1 loop); process 0's choice must reach both, or their programs would differ.
    job = start_job("run", processes=2, devices=2, cache_dir=cache_dir, strategy="auto-split")
    codes = job.wait(RUN_TIMEOUT)
    assert codes == [0, 0], job.logs()
    results = job.results()
    assert [r["teacher_strategy"] for r in results] == ["vmap", "vmap"]
    _check_matches_reference(results, reference)
    # Only process 0 logs.
    assert "step 12" in job.stdout(0)
    assert "step" not in job.stdout(1)

    # The teacher cache was built in parallel: each process cached its own rows of the
    # unshuffled pass (rows [16 b + 8 p, 16 b + 8 p + 8) of batch b), and the student
    # distilled from it matches the run with the teachers in the step.
    assert all(r["cache_shards"] == ["p0", "p1"] for r in results)
    split, teachers, _ = multihost_worker._problem()
    want = (
        np.einsum("nd,kdc->knc", split.x.astype(np.float64), teachers["w"]) + teachers["b"][:, None]
    )
    rows = np.arange(multihost_worker.N).reshape(-1, 2, multihost_worker.BATCH // 2)
    for p in range(2):
        shard = open_cache(cache_dir, shards=[f"p{p}"])
        assert shard.num_written == multihost_worker.N // 2
        mine, other = rows[:, p].ravel(), rows[:, 1 - p].ravel()
        np.testing.assert_allclose(shard.lookup(mine), want[:, mine], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="not in the cache"):
            shard.lookup(other[:1])
    _check_matches_reference(results, reference, params_key="cached_params", loaded=False)


@needs_gloo
@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_four_processes_train_like_one(start_job, reference):
    # Real "auto" timings on four processes: one choice (process 0's) on all of them.
    job = start_job("run", processes=4, devices=1, strategy="auto")
    codes = job.wait(RUN_TIMEOUT)
    assert codes == [0] * 4, job.logs()
    results = job.results()
    assert len({r["teacher_strategy"] for r in results}) == 1
    _check_matches_reference(results, reference)


def _complete_checkpoints(directory: Path) -> list[int]:
    latest = directory / "latest"
    if not latest.is_dir():
        return []
    return sorted(int(d.name) for d in latest.iterdir() if d.name.isdigit())


@pytest.mark.slow  # a whole run in a subprocess or many compiles: kept out of the 10-minute suite
@needs_gloo
@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_killed_process_stops_the_job_and_a_restart_resumes(start_job, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    # Slow batches (0.3 s each) so that the kill lands mid-run.
    job = start_job(
        "killed",
        processes=2,
        devices=2,
        checkpoint_dir=ckpt,
        delay=0.3,
        heartbeat=KILL_HEARTBEAT,
    )
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any(s >= 4 for s in _complete_checkpoints(ckpt)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in job.procs):
            job.kill_all()
            pytest.fail(f"no checkpoint at step >= 4 in {ckpt}:\n{job.logs()}")
        time.sleep(0.05)
    saved = max(_complete_checkpoints(ckpt))
    job.kill(1)
    killed_at = time.monotonic()
    # The survivor must not hang on its dead peer: it aborts, naming the failure.
    (code,) = job.wait(FAIL_FAST, procs=[0])
    took = time.monotonic() - killed_at
    assert code != 0, job.logs()
    assert ABORT.search(job.stderr(0)), job.logs()
    assert took <= FAIL_FAST
    assert "step 12" not in job.stdout(0)

    # All processes restarted on the same directory carry on from the last checkpoint.
    restart = start_job("restarted", processes=2, devices=2, checkpoint_dir=ckpt)
    assert restart.wait(RUN_TIMEOUT) == [0, 0], restart.logs()
    results = restart.results()
    resumed = results[0]["resumed_from"]
    assert resumed is not None and saved <= resumed < multihost_worker.EPOCHS * 6
    assert all(r["resumed_from"] == resumed for r in results)
    _check_matches_reference(results, reference, start_step=resumed)


# ---------------------------------------------------------------------------------------------
# The single-process side of mtkd_jax.parallel (no subprocess).


def test_distributed_requested_reads_the_environment():
    assert not parallel.distributed_requested({})
    assert not parallel.distributed_requested({"MTKD_DISTRIBUTED": "0"})
    assert parallel.distributed_requested({"MTKD_DISTRIBUTED": "yes"})
    assert parallel.distributed_requested({"MTKD_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="MTKD_DISTRIBUTED"):
        parallel.distributed_requested({"MTKD_DISTRIBUTED": "maybe"})


@pytest.mark.parametrize(
    "kwargs, environ, match",
    [
        ({"coordinator_address": "no-port"}, {}, r"`coordinator_address` \(or \$MTKD_COORD"),
        ({}, {"MTKD_COORDINATOR": "10.0.0.1:x"}, "'host:port'"),
        ({"num_processes": 0}, {}, r"`num_processes` .* >= 1, got 0"),
        ({}, {"MTKD_NUM_PROCESSES": "two"}, r"MTKD_NUM_PROCESSES.* integer, got 'two'"),
        ({"num_processes": 2, "process_id": 2}, {}, r"`process_id` .* in \[0, 2\)"),
        ({}, {"MTKD_NUM_PROCESSES": "2", "MTKD_PROCESS_ID": "-1"}, "MTKD_PROCESS_ID"),
        ({"local_device_ids": "0,a"}, {}, "local_device_ids"),
        ({"cpu_collectives": "nccl"}, {}, "cpu_collectives"),
        ({"heartbeat_timeout_seconds": 0}, {}, "heartbeat_timeout_seconds"),
    ],
)
def test_initialize_distributed_rejects_bad_settings(kwargs, environ, match):
    with pytest.raises(ValueError, match=match):
        parallel.initialize_distributed(environ=environ, **kwargs)


def test_initialize_distributed_single_process_starts_nothing():
    info = parallel.initialize_distributed(environ={"MTKD_NUM_PROCESSES": "1"})
    assert info == parallel.ProcessInfo(
        0, 1, jax.local_device_count(), jax.device_count(), False
    )
    assert not jax.distributed.is_initialized()
    assert parallel.is_main_process()


def test_initialize_distributed_after_jax_started_says_so():
    jax.devices()  # this process's backend is up (conftest and other tests use it)
    with pytest.raises(RuntimeError, match="must run before anything that starts JAX"):
        parallel.initialize_distributed(
            coordinator_address="127.0.0.1:1", num_processes=2, process_id=0, environ={}
        )
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_without_any_cluster_explains_the_settings(monkeypatch):
    def no_cluster(**kwargs):
        assert kwargs["coordinator_address"] is None  # left to JAX's detection
        raise ValueError("coordinator_address should be defined.")  # what JAX 0.10 raises

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ValueError, match="JAX detected no cluster; set MTKD_COORDINATOR"):
        parallel.initialize_distributed(environ={})


@pytest.mark.slow
def test_initialize_distributed_without_any_cluster_in_a_fresh_process():
    code = "from mtkd_jax.parallel import initialize_distributed; initialize_distributed()"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_child_env({}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "JAX detected no cluster; set MTKD_COORDINATOR=host:port" in out.stderr, out.stderr


def test_global_batches_equal_shard_batch_on_one_process(rng):
    mesh = data_mesh(jax.devices()[:4])
    local = [
        {
            "x": rng.normal(size=(8, 3)).astype(np.float32),
            "teacher_logits": rng.normal(size=(2, 8, 5)).astype(np.float32),
        }
        for _ in range(3)
    ]
    closed = []

    def source():
        try:
            yield from local
        finally:
            closed.append(True)

    out = parallel.global_batches(source(), mesh)
    first = next(out)
    expect = shard_batch(local[0], mesh)
    for k in expect:
        assert first[k].sharding.is_equivalent_to(expect[k].sharding, first[k].ndim)
        np.testing.assert_array_equal(first[k], local[0][k])
    out.close()
    assert closed == [True]
    with pytest.raises(ValueError, match="Local .* batch size 6 does not divide over 4"):
        next(parallel.global_batches([{"x": np.zeros((6, 1))}], mesh))


def test_broadcast_from_main_and_barrier_on_one_process():
    out = parallel.broadcast_from_main({"a": 3, "b": np.arange(2.0)})
    assert out["a"] == 3 and isinstance(out["a"], np.ndarray)
    np.testing.assert_array_equal(out["b"], [0.0, 1.0])
    parallel.barrier("test")
    with pytest.raises(ValueError, match="`name`"):
        parallel.barrier("")
