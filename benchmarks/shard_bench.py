"""Per-device parameter memory and step time: replicated vs sharded teachers (and student).

Run:  python benchmarks/shard_bench.py [--json FILE] [--quick] [--mesh 2x4] [--repeats N]

On a CPU this sets `--xla_force_host_platform_device_count=8` before importing jax (8 fake
devices; unless XLA_FLAGS already sets a count), so the default 2 x 4 mesh ("data" x
"model") exists on any machine. On GPUs it uses the devices there (`--mesh 1xD` by default).

Workload: K = 4 same-architecture MLP teachers (in 256 -> 2048 -> 100, stacked, frozen), an
MLP student (256 -> 512 -> 100, Adam), batches of 256 N(0, 1) inputs with labels in
[0, 100), `make_distill_step` (T = 4, alpha = 0.5). Variants (`mtkd_jax.parallel`):

  replicated           teachers and student replicated (today's `data_parallel_step`)
  teachers_fsdp        teachers `stacked(fsdp())`, student replicated
  both_fsdp            teachers `stacked(fsdp())`, student state `fsdp()`
  teachers_per_group   teachers `per_teacher()`: one teacher per device group ("model")
  data_parallel        all replicated on a (data * model) x 1 mesh: today's data parallelism,
                       every device on a different slice of the batch (the same memory as
                       `replicated`, no compute repeated along "model")

For each: per-device bytes of the teachers and of the student state (the arrays' addressable
shards on device 0), XLA's `memory_analysis()` of the compiled step (argument and temporary
bytes per device), and the step time (median of interleaved repeats, compile apart); ratios
are to `replicated`, within this one process.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mtkd_jax.parallel import (  # noqa: E402
    fsdp,
    make_mesh,
    per_teacher,
    replicated,
    sharded_step,
    stacked,
    state_shardings,
    tree_shardings,
)
from mtkd_jax.teachers import make_stacked_apply  # noqa: E402
from mtkd_jax.training.state import init_train_state  # noqa: E402
from mtkd_jax.training.steps import make_distill_step  # noqa: E402


def variants(min_size: int) -> dict:
    """name -> (teacher rule, student rule)."""
    return {
        "replicated": (replicated(), replicated()),
        "teachers_fsdp": (stacked(fsdp(min_size=min_size)), replicated()),
        "both_fsdp": (stacked(fsdp(min_size=min_size)), fsdp(min_size=min_size)),
        "teachers_per_group": (per_teacher(), replicated()),
        # Today's data parallelism: every device on the data axis, all replicated.
        "data_parallel": (replicated(), replicated()),
    }


def mlp(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def init_mlp(key, d, h, c, lead=()):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, lead + (d, h)) / np.sqrt(d),
        "b1": jnp.zeros(lead + (h,)),
        "w2": jax.random.normal(k2, lead + (h, c)) / np.sqrt(h),
        "b2": jnp.zeros(lead + (c,)),
    }


def device0_bytes(tree) -> int:
    """Bytes of `tree`'s leaves held on the first device of their sharding."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        first = leaf.sharding.mesh.devices.flat[0]
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
    return total


def parse_mesh(text: str | None) -> tuple[int, int]:
    if text is None:
        n = jax.device_count()
        return (2, n // 2) if jax.default_backend() == "cpu" and n % 2 == 0 else (1, n)
    data, model = (int(v) for v in text.lower().split("x"))
    return data, model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--mesh", help="DATAxMODEL, e.g. 2x4 (default: 2 x D/2 on CPU, 1 x D)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variants", help="comma-separated subset (default: all; replicated first)")
    args = ap.parse_args(argv)

    data, model = parse_mesh(args.mesh)
    grid = make_mesh(data, model, devices=jax.devices()[: data * model])
    flat = make_mesh(data * model, 1, devices=jax.devices()[: data * model])
    if model == 1:
        print(f"NOTE: {jax.device_count()} device(s), model axis of size 1: nothing is split, "
              "every variant is the replicated one.")
    k, b, d, th, sh, c = (4, 16, 16, 64, 32, 10) if args.quick else (4, 256, 256, 2048, 512, 100)
    repeats = args.repeats or (3 if args.quick else 15)
    key = jax.random.key(0)
    teachers = init_mlp(jax.random.fold_in(key, 1), d, th, c, (k,))
    tx = optax.adam(1e-3)
    state0 = init_train_state(init_mlp(jax.random.fold_in(key, 2), d, sh, c), tx)
    r = np.random.default_rng(0)
    batch = {"x": r.normal(size=(b, d)).astype(np.float32),
             "y": r.integers(0, c, size=b).astype(np.int32)}
    step_fn = make_distill_step(mlp, make_stacked_apply(mlp, strategy="vmap"), tx,
                                temperature=4.0, alpha=0.5)

    table = variants(256 if args.quick else 2**14)
    chosen = ["replicated"] + [
        v for v in (args.variants.split(",") if args.variants else table) if v != "replicated"
    ]
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        ap.error(f"unknown --variants {unknown}; known: {sorted(table)}")
    runs = {}
    for name in chosen:
        teacher_rule, student_rule = table[name]
        mesh = flat if name == "data_parallel" else grid
        t_sh = tree_shardings(teachers, mesh, teacher_rule)
        s_sh = state_shardings(state0, mesh, student_rule)
        step = sharded_step(step_fn, mesh, state_shardings=s_sh, teacher_shardings=t_sh)
        tp, state = jax.device_put(teachers, t_sh), jax.device_put(state0, s_sh)
        start = time.perf_counter()
        compiled = step.lower(state, batch, key, teacher_params=tp).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        jax.block_until_ready(step(state, batch, key, teacher_params=tp))  # warm-up
        runs[name] = dict(
            step=step, tp=tp, state=state, times=[], compile_s=compile_s,
            teacher_bytes=device0_bytes(tp), student_bytes=device0_bytes(state),
            argument_bytes=int(mem.argument_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
        )
    names = list(runs)
    for i in range(repeats):  # interleaved, order reversed every other repeat
        for name in names if i % 2 == 0 else names[::-1]:
            run = runs[name]
            start = time.perf_counter()
            jax.block_until_ready(run["step"](run["state"], batch, key, teacher_params=run["tp"]))
            run["times"].append(time.perf_counter() - start)

    base = runs["replicated"]
    out = {
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": jax.device_count(), "mesh": dict(grid.shape), "quick": args.quick,
        "workload": dict(K=k, B=b, D=d, teacher_hidden=th, student_hidden=sh, C=c),
        "repeats": repeats, "variants": {},
    }
    header = (f"{'variant':<20}{'teachers/dev':>13}{'student/dev':>12}{'XLA args':>10}"
              f"{'XLA temp':>10}{'step ms':>9}  ratios to replicated: teachers, args, time")
    print(f"mesh {dict(grid.shape)}, backend {jax.default_backend()}, K={k}, B={b}; "
          "bytes per device in KiB")
    print(header)
    for name, run in runs.items():
        med = statistics.median(run["times"])
        # Paired ratio: median over repeats of this variant's time / replicated's time.
        ratio_t = statistics.median(t / u for t, u in zip(run["times"], base["times"], strict=True))
        row = {
            "teacher_bytes_per_device": run["teacher_bytes"],
            "student_state_bytes_per_device": run["student_bytes"],
            "xla_argument_bytes": run["argument_bytes"],
            "xla_temp_bytes": run["temp_bytes"],
            "step_ms_median": med * 1e3,
            "compile_s": run["compile_s"],
            "teacher_bytes_ratio": run["teacher_bytes"] / base["teacher_bytes"],
            "student_bytes_ratio": run["student_bytes"] / base["student_bytes"],
            "argument_bytes_ratio": run["argument_bytes"] / base["argument_bytes"],
            "step_time_ratio": ratio_t,
        }
        out["variants"][name] = row
        kib = [run[n] / 1024 for n in ("teacher_bytes", "student_bytes", "argument_bytes",
                                        "temp_bytes")]
        print(f"{name:<20}{kib[0]:>13.1f}{kib[1]:>12.1f}{kib[2]:>10.1f}{kib[3]:>10.1f}"
              f"{med * 1e3:>9.2f}  {row['teacher_bytes_ratio']:.3f}, "
              f"{row['argument_bytes_ratio']:.3f}, {ratio_t:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
