"""Teacher-inference strategy across models and batch sizes: vmap vs loop vs auto.

Run:  python benchmarks/strategy_bench.py [--json FILE] [--quick] [--preset cpu|gpu]

For every (model, batch size), K = 3 same-architecture teachers are run by
`make_stacked_apply` with strategy "vmap" (`jax.vmap` over the stacked params), "loop"
(K passes unrolled in one jit) and "auto" (the library times both once when the function
is built, with its default `num_repeats`, and keeps the faster). The three are then timed
alternately, one measurement each per round (a call shorter than ~50 ms is repeated within
its measurement), and the minimum over rounds is kept (the least noisy estimate on a
shared machine). `auto / best` is auto's measured time over the better of vmap and loop;
`paired` is the median over rounds of auto's time over the better strategy's time in the
same round; `chosen / best` is the time of the strategy auto chose over the better one,
both read from the vmap and loop columns (free of a third measurement's noise). The target
is <= 1.05 everywhere (auto within 5% of the better one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import models, teachers

K = 3

# (model name, model kwargs, input shape without batch, classes, batch sizes)
PRESETS = {
    "cpu": [
        ("mlp", dict(features=(128, 128)), (40,), 10, (32, 256, 2048)),
        ("cnn1d", {}, (40,), 10, (32, 256)),
        ("small_convnet", {}, (32, 32, 3), 100, (32, 128)),
        ("convnet", {}, (32, 32, 3), 100, (16, 64)),
        ("resnet", dict(widths=(16, 32), blocks=(1, 1)), (16, 16, 3), 10, (32, 128)),
    ],
    "gpu": [
        ("mlp", dict(features=(1024, 1024)), (784,), 10, (1024, 8192)),
        ("cnn1d", {}, (40,), 10, (1024, 8192)),
        ("small_convnet", {}, (32, 32, 3), 100, (256, 1024)),
        ("convnet", {}, (32, 32, 3), 100, (256, 1024)),
        ("resnet", dict(widths=(64, 128, 256), blocks=(2, 2, 2)), (32, 32, 3), 100, (256, 1024)),
    ],
    "quick": [
        ("mlp", dict(features=(32,)), (8,), 4, (8,)),
        ("small_convnet", dict(widths=(4, 8)), (8, 8, 3), 4, (4,)),
    ],
}


def bench_one(name, kwargs, shape, classes, batch, rounds, dtype):
    model = models.make_model(name, num_classes=classes, dtype=dtype, **kwargs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32))
    keys = jax.random.split(jax.random.key(0), K)
    tp = teachers.stack_params([models.init_params(model, k, x[:1]) for k in keys])
    apply = models.apply_fn_of(model)
    t0 = time.perf_counter()
    # As a user would call it: the library's default number of timing repeats.
    chosen = teachers.choose_runner(apply, tp, x)
    auto = jax.jit(teachers.make_stacked_apply(apply, runner="auto", example_params=tp,
                                               example_x=x))
    choice_s = time.perf_counter() - t0
    fns = {
        "vmap": jax.jit(teachers.make_stacked_apply(apply, runner="vmap")),
        "loop": jax.jit(teachers.make_stacked_apply(apply, runner="loop")),
        "auto": auto,
    }
    single = []
    for fn in fns.values():
        jax.block_until_ready(fn(tp, x))
        t = time.perf_counter()
        jax.block_until_ready(fn(tp, x))
        single.append(time.perf_counter() - t)
    # Short calls are repeated within a measurement (>= ~50 ms), to rise above timer noise.
    calls = max(1, round(0.05 / min(single)))
    times = {s: [] for s in fns}
    names = list(fns)
    for r in range(rounds):
        # A different order each round, so no strategy always runs right after another.
        for s in names[r % 3 :] + names[: r % 3]:
            fn = fns[s]
            t = time.perf_counter()
            for _ in range(calls):
                out = fn(tp, x)
            jax.block_until_ready(out)
            times[s].append((time.perf_counter() - t) / calls)
    best = {s: min(v) for s, v in times.items()}
    better = min(best["vmap"], best["loop"])
    faster = "vmap" if best["vmap"] < best["loop"] else "loop"
    # Paired within each round, as benchmarks/run.py reads its ratios: load that comes and
    # goes hits both members of a pair, which a ratio of two minima does not cancel.
    paired = float(np.median(np.asarray(times["auto"]) / np.asarray(times[faster])))
    return {
        "model": name,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "batch": batch,
        "vmap_ms": round(1e3 * best["vmap"], 2),
        "loop_ms": round(1e3 * best["loop"], 2),
        "auto_ms": round(1e3 * best["auto"], 2),
        "auto_chose": chosen,
        "faster": faster,
        "loop_over_vmap": round(best["loop"] / best["vmap"], 3),
        "auto_over_best": round(best["auto"] / better, 3),
        "auto_over_best_paired": round(paired, 3),
        # The choice judged on the vmap/loop columns alone (no third measurement's noise).
        "chosen_over_best": round(best[chosen] / better, 3),
        "calls_per_measurement": calls,
        "choice_s": round(choice_s, 2),
        "load": round(os.getloadavg()[0], 2),
    }


def table(rows) -> str:
    head = (
        f"{'model':<14} {'B':>5} {'vmap ms':>10} {'loop ms':>10} {'auto ms':>10} "
        f"{'auto chose':>10} {'faster':>6} {'auto/best':>9} {'paired':>6} {'chosen/best':>11} "
        f"{'choice s':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model']:<14} {r['batch']:>5} {r['vmap_ms']:>10.2f} {r['loop_ms']:>10.2f} "
            f"{r['auto_ms']:>10.2f} {r['auto_chose']:>10} {r['faster']:>6} "
            f"{r['auto_over_best']:>9.3f} {r['auto_over_best_paired']:>6.3f} "
            f"{r['chosen_over_best']:>11.3f} {r['choice_s']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9)")
    p.add_argument("--models", help="comma-separated subset of the preset's models")
    args = p.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    rows_wanted = PRESETS[preset]
    if args.models:
        wanted = set(args.models.split(","))
        unknown = wanted - {r[0] for r in rows_wanted}
        if unknown:
            p.error(f"--models: {sorted(unknown)} not in the {preset!r} preset")
        rows_wanted = [r for r in rows_wanted if r[0] in wanted]
    rounds = args.rounds or (2 if args.quick else 9)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rows = []
    for name, kwargs, shape, classes, batch_sizes in rows_wanted:
        for b in batch_sizes:
            rows.append(bench_one(name, kwargs, shape, classes, b, rounds, dtype))
            print(table(rows[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    worst = max(r["auto_over_best"] for r in rows)
    worst_paired = max(r["auto_over_best_paired"] for r in rows)
    worst_choice = max(r["chosen_over_best"] for r in rows)
    out = {
        "preset": preset,
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "rows": rows,
        "worst_auto_over_best": worst,
        "auto_within_5pct": worst <= 1.05,
        "worst_auto_over_best_paired": worst_paired,
        "auto_within_5pct_paired": worst_paired <= 1.05,
        "worst_chosen_over_best": worst_choice,
        "load_avg_end": list(os.getloadavg()),
    }
    print(table(rows))
    verdict = lambda v: "OK" if v <= 1.05 else "ABOVE"
    print(
        f"\nworst auto/best = {worst:.3f} ({verdict(worst)} the 1.05 target); paired "
        f"{worst_paired:.3f} ({verdict(worst_paired)}); worst chosen/best = "
        f"{worst_choice:.3f} ({verdict(worst_choice)})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
