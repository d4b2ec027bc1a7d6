"""Worker for tests/test_multihost.py: one process of a multi-process distillation run.

    MTKD_COORDINATOR=127.0.0.1:PORT MTKD_NUM_PROCESSES=P MTKD_PROCESS_ID=p \\
    XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu \\
    python tests/multihost_worker.py --out DIR [--checkpoint-dir DIR] [--cache-dir DIR]
        [--delay SECONDS] [--heartbeat SECONDS] [--strategy vmap|auto|auto-split]

Each process joins the job through `mtkd_jax.parallel.initialize_distributed` (settings
from the environment, CPU collectives over gloo), builds a mesh over the devices of all
processes, reads only its rows of each global batch (`mtkd_jax.data.batches`), makes global
arrays of them (`global_batches`) and trains a student on three frozen teachers with the
library's data-parallel distillation step, driven by `mtkd_jax.training.fit.fit` (with orbax
checkpoints when `--checkpoint-dir` is given). With `--cache-dir` it then builds a
teacher-output cache, each process caching its own rows, and trains again from the cache.
Process 0 prints `step <n>` after each update, flushed, so a test can kill a process mid-run.
Every process writes `DIR/process<p>.json`: its final parameters, the run's step and resume
point, the example indices it loaded and the job's shape. `train` is importable, so a test
can run the same training in one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np

N, D, H, C, K = 96, 6, 8, 4, 3  # examples, input size, hidden units, classes, teachers
BATCH, EPOCHS = 16, 2
STEPS_PER_EPOCH = N // BATCH  # 6, so 12 updates in all
SAVE_EVERY = 2


def _problem():
    """The data split, the teachers' stacked params and the student's initial params."""
    from mtkd_jax.data import Split

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(D, C)), -1).astype(np.int32)
    teachers = {
        "w": rng.normal(size=(K, D, C)).astype(np.float32),
        "b": rng.normal(size=(K, C)).astype(np.float32),
    }
    student = {
        "w1": (0.5 * rng.normal(size=(D, H))).astype(np.float32),
        "b1": np.zeros(H, np.float32),
        "w2": (0.5 * rng.normal(size=(H, C))).astype(np.float32),
        "b2": np.zeros(C, np.float32),
    }
    return Split("train", x, y), teachers, student


def _student_apply(params, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _teacher_apply(params, x):
    return x @ params["w"] + params["b"]


def _teachers(strategy="vmap"):
    """The frozen teachers: `(teacher_apply, stacked params, strategy)`.

    With "auto" each process times both strategies on its own and process 0's choice is
    broadcast (`choose_strategy`); the reference run uses "vmap".
    """
    from mtkd_jax.teachers import choose_strategy, make_stacked_apply

    split, params, _ = _problem()
    if strategy == "auto":
        strategy = choose_strategy(_teacher_apply, params, split.x[:BATCH], num_repeats=1)
    return make_stacked_apply(_teacher_apply, strategy=strategy), params, strategy


def _split_timings(process_index):
    """Make the processes' timings disagree: process 0 finds vmap faster, the others loop."""
    from mtkd_jax.teachers import autotune

    fast, slow = ("vmap", "loop") if process_index == 0 else ("loop", "vmap")
    autotune.time_strategies = lambda *a, **k: {fast: 1.0, slow: 9.0}


def build_cache(path, *, process_index, process_count):
    """Each process caches the teachers' logits of its rows of one pass over the split."""
    from mtkd_jax.cache import build_cache_in_parallel
    from mtkd_jax.data import batches

    split = _problem()[0]
    teacher_apply, teacher_params, _ = _teachers()
    local = batches(
        split,
        batch_size=BATCH,
        seed=0,
        epoch=0,
        shuffle=False,
        drop_remainder=False,
        process_index=process_index,
        process_count=process_count,
    )
    return build_cache_in_parallel(
        path, teacher_apply, teacher_params, local, num_examples=N, dtype=np.float32
    )


def train(
    mesh,
    *,
    process_index,
    process_count,
    checkpoint_dir=None,
    cache=None,
    delay=0.0,
    log_fn=None,
    teachers=None,
):
    """Distil the student for EPOCHS epochs on `mesh`; return `(FitResult, loaded indices)`.

    The teachers run in the step, or with a `cache` (`mtkd_jax.cache.TeacherCache`) their
    logits are read from it. With `process_count` 1 and a mesh of the same number of
    devices this is the single-process run that a P-process run must reproduce.
    """
    import jax
    import optax

    from mtkd_jax.cache import with_cached_logits
    from mtkd_jax.data import batches
    from mtkd_jax.parallel import data_parallel_step, global_batches, replicate
    from mtkd_jax.training.fit import fit
    from mtkd_jax.training.state import init_train_state
    from mtkd_jax.training.steps import make_distill_step

    split, _, student_params = _problem()
    teacher_apply, teacher_params, _ = teachers or _teachers()
    tx = optax.adam(0.05)
    step = make_distill_step(
        _student_apply,
        None if cache is not None else teacher_apply,
        tx,
        weighting="confidence",
        temperature=2.0,
        alpha=0.3,
    )
    step = data_parallel_step(step, mesh)
    if cache is None:  # replicated arguments of the compiled step, passed at every call
        step = functools.partial(step, teacher_params=teacher_params)
    state = replicate(init_train_state(student_params, tx), mesh)
    loaded = []

    def local_batches(epoch, start):
        for batch in batches(
            split,
            batch_size=BATCH,
            seed=0,
            epoch=epoch,
            start=start,
            process_index=process_index,
            process_count=process_count,
        ):
            time.sleep(delay)  # like slow data loading, so that a kill lands mid-run
            loaded.append(batch["index"].tolist())
            yield batch

    def batches_fn(epoch, start):
        local = local_batches(epoch, start)
        if cache is not None:
            local = with_cached_logits(local, cache)
        return global_batches(local, mesh)

    result = fit(
        state,
        step,
        batches_fn,
        num_epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        key=jax.random.key(7),
        checkpoint_dir=checkpoint_dir,
        save_every=SAVE_EVERY,
        check_every=1,
        progress=False,
        log_fn=log_fn,
    )
    return result, loaded


def host_params(params) -> dict:
    """Parameters as nested lists (float32 values are exact in JSON)."""
    import jax

    return jax.tree.map(lambda a: np.asarray(a).tolist(), params)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--cache-dir")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--heartbeat", type=int, default=10)
    parser.add_argument("--strategy", choices=("vmap", "auto", "auto-split"), default="vmap")
    args = parser.parse_args(argv)

    from mtkd_jax.parallel import initialize_distributed, is_main_process

    info = initialize_distributed(
        heartbeat_timeout_seconds=args.heartbeat,
        initialization_timeout=60,
        shutdown_timeout_seconds=30,
    )
    from mtkd_jax.parallel import data_mesh

    def log_fn(step, metrics):
        if "train/loss" in metrics:
            print(f"step {step}", flush=True)

    mesh = data_mesh()
    if args.strategy == "auto-split":
        _split_timings(info.process_index)
    teachers = _teachers("vmap" if args.strategy == "vmap" else "auto")
    result, loaded = train(
        mesh,
        process_index=info.process_index,
        process_count=info.process_count,
        checkpoint_dir=args.checkpoint_dir,
        delay=args.delay,
        log_fn=log_fn,
        teachers=teachers,
    )
    record = {
        "info": info._asdict(),
        "main": is_main_process(),
        "step": result.step,
        "resumed_from": result.resumed_from,
        "params": host_params(result.state.params),
        "loss": [r["loss"] for r in result.history["train"]],
        "loaded": loaded,
        "teacher_strategy": teachers[2],
    }
    if args.cache_dir:
        # Teachers run once, each process over its own rows; then distil from the cache.
        cache = build_cache(
            args.cache_dir, process_index=info.process_index, process_count=info.process_count
        )
        cached, _ = train(
            mesh, process_index=info.process_index, process_count=info.process_count, cache=cache
        )
        record["cache_shards"] = cache.shards
        record["cached_params"] = host_params(cached.state.params)
    path = os.path.join(args.out, f"process{info.process_index}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    print("done", flush=True)


if __name__ == "__main__":
    main()
