"""Teacher-output cache on MNIST-1D: bytes, build time, and what top-k costs in accuracy.

Run:  python benchmarks/cache_bench.py [--json FILE] [--quick] [--seeds 3] [--epochs 40]

1. Train K = 3 `CNN1D` teachers at once (`make_ensemble_train_step`, different seeds).
2. Build caches over the training split (`mtkd_jax.cache.build_cache`): full float16 logits
   and top-k float16 log-probabilities for several k; report bytes per example, build time
   and the peak-RSS growth of each build.
3. Distill a small `CNN1D` student with the standard loss (T = 4, CA-MKD confidence
   weights, `0.5 CE + 0.5 T^2 KL`; Adam 1e-2, batch 128) from online teachers, from each
   cache (top-k with both reconstructions, "renormalize" and "uniform") and, as the
   floor, alone (CE only), with the same student seeds and batch order; report test
   accuracy (mean and spread over seeds) and the difference to online distillation, plus
   each run's training time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from mtkd_jax import cache as mcache
from mtkd_jax import data, models, teachers
from mtkd_jax.training import state as mk_state
from mtkd_jax.training import steps

K, TEMPERATURE, ALPHA, BATCH = 3, 4.0, 0.5, 128
# Adam, not the speed benchmark's SGD(0.05, momentum 0.9): with the T^2-scaled soft loss
# that SGD setting diverged for some student seeds on MNIST-1D (test accuracy 0.10).
STUDENT_LR = 1e-2


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def epoch_batches(split, seed: int, epoch: int):
    return data.batches(
        split, batch_size=BATCH, seed=seed, epoch=epoch, process_index=0, process_count=1
    )


def train_teachers(ds, epochs: int, log):
    model = models.CNN1D(num_classes=ds.info.num_classes)
    apply = models.apply_fn_of(model)
    tx = optax.adam(1e-3)
    x0 = jnp.zeros((1, *ds.info.input_shape))
    init = jax.vmap(lambda k: models.init_params(model, k, x0))
    state = mk_state.init_stacked_train_state(init(jax.random.split(jax.random.key(100), K)), tx)
    step = jax.jit(steps.stacked_step(steps.make_supervised_step(apply, tx)))
    t0 = time.perf_counter()
    for e in range(epochs):
        for b in epoch_batches(ds.train, seed=100, epoch=e):
            state, _ = step(state, {"x": b["x"], "y": b["y"]}, jax.random.key(e))
    jax.block_until_ready(state)
    acc = jax.vmap(lambda p: jnp.mean(jnp.argmax(apply(p, ds.test.x), -1) == ds.test.y))(
        state.params
    )
    log(
        f"teachers: {epochs} epochs in {time.perf_counter() - t0:.1f} s, test accuracy "
        f"{[round(float(a), 4) for a in acc]}"
    )
    return apply, state.params, [float(a) for a in acc]


def build_caches(ds, teacher_apply, tp, ks, root, log):
    n = len(ds.train)
    out, caches = {}, {}
    for k in (None, *ks):
        name = "full_f16" if k is None else f"top{k}"
        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        batches = data.batches(
            ds.train,
            batch_size=256,
            seed=0,
            epoch=0,
            shuffle=False,
            drop_remainder=False,
            process_index=0,
            process_count=1,
        )
        c = mcache.build_cache(
            os.path.join(root, name),
            teacher_apply,
            tp,
            batches,
            num_examples=n,
            top_k=k,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        caches[name] = c
        out[name] = {
            "top_k": k,
            "bytes_per_example": c.bytes_per_example,
            "disk_bytes": sum(os.path.getsize(os.path.join(c.path, f)) for f in os.listdir(c.path)),
            "build_s": round(seconds, 3),
            "build_img_s": round(n / seconds, 1),
            "peak_rss_growth_mb": round(peak_rss_mb() - rss0, 1),
        }
        log(f"cache {name}: {c.bytes_per_example} B/example, built in {seconds:.2f} s")
    return caches, out


def distill_run(ds, mode, seed, epochs, teacher_apply, tp, cache):
    student = models.CNN1D(num_classes=ds.info.num_classes, features=(8, 8, 16), hidden=32)
    s_apply = models.apply_fn_of(student)
    tx = optax.adam(STUDENT_LR)
    params = models.init_params(student, jax.random.key(seed), jnp.zeros((1, 40)))
    state = mk_state.init_train_state(params, tx)
    kw = dict(weighting="confidence", temperature=TEMPERATURE, alpha=ALPHA)
    if mode == "alone":
        step = jax.jit(steps.make_supervised_step(s_apply, tx))
    elif mode == "online":
        online = steps.make_distill_step(s_apply, teacher_apply, tx, **kw)
        step = jax.jit(functools.partial(online, teacher_params=tp))
    else:
        step = jax.jit(steps.make_distill_step(s_apply, None, tx, **kw))
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    for e in range(epochs):
        batches = epoch_batches(ds.train, seed=seed, epoch=e)
        if cache is not None:
            batches = mcache.with_cached_logits(batches, cache)
        for b in batches:
            b = {k: v for k, v in b.items() if k != "index"}
            state, _ = step(state, b, key)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    acc = float(jnp.mean(jnp.argmax(s_apply(state.params, ds.test.x), -1) == ds.test.y))
    return acc, seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--ks", default="1,2,3,5")
    args = p.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (2 if args.quick else 40)
    t_epochs = args.teacher_epochs or (2 if args.quick else 40)
    ks = [int(k) for k in args.ks.split(",")]
    start = time.perf_counter()

    ds = data.load("mnist1d")
    teacher_apply_1, tp, teacher_acc = train_teachers(ds, t_epochs, log)
    teacher_apply = jax.jit(teachers.make_stacked_apply(
        teacher_apply_1, strategy="auto", example_params=tp, example_x=ds.train.x[:BATCH]
    ))
    ens = jnp.mean(jax.nn.softmax(teacher_apply(tp, ds.test.x), -1), 0)
    ensemble_acc = float(jnp.mean(jnp.argmax(ens, -1) == ds.test.y))
    with tempfile.TemporaryDirectory() as root:
        caches, cache_info = build_caches(ds, teacher_apply, tp, ks, root, log)
        runs = [("alone", None, None), ("online", None, None), ("full_f16", "full_f16", None)]
        for k in ks:
            for fill in mcache.FILLS:
                runs.append((f"top{k}_{fill}", f"top{k}", fill))
        results = {}
        for name, cache_name, fill in runs:
            c = None
            if cache_name is not None:
                c = mcache.open_cache(
                    caches[cache_name].path,
                    fill=fill or "renormalize",
                    expect_fingerprint=caches[cache_name].header["fingerprint"],
                )
            mode = name if name in ("alone", "online") else "cached"
            accs, secs = [], []
            for s in range(seeds):
                a, t = distill_run(ds, mode, s, epochs, teacher_apply, tp, c)
                accs.append(a)
                secs.append(t)
            results[name] = {
                "acc": accs,
                "mean": statistics.fmean(accs),
                "train_s": statistics.median(secs),
            }
            r = results[name]
            log(f"{name:<22} acc {r['mean']:.4f} {accs} ({r['train_s']:.1f} s)")
    base = results["online"]["mean"]
    for r in results.values():
        r["minus_online"] = round(r["mean"] - base, 4)
        # Paired by seed: the same student init and batch order, so the seed noise cancels.
        r["paired_minus_online"] = [
            round(a - b, 4) for a, b in zip(r["acc"], results["online"]["acc"], strict=True)
        ]
    out = {
        "teacher_test_acc": teacher_acc,
        "ensemble_test_acc": ensemble_acc,
        "num_train": len(ds.train),
        "seeds": seeds,
        "student_epochs": epochs,
        "teacher_epochs": t_epochs,
        "cache": cache_info,
        "runs": results,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "load_avg_end": list(os.getloadavg()),
    }
    print(f"teachers {teacher_acc}, ensemble {ensemble_acc:.4f}; train N={len(ds.train)}")
    print(f"{'cache':<10} {'B/example':>9} {'disk KB':>8} {'build s':>8} {'img/s':>9}")
    for name, c in cache_info.items():
        print(
            f"{name:<10} {c['bytes_per_example']:>9} {c['disk_bytes'] / 1024:>8.0f} "
            f"{c['build_s']:>8.2f} {c['build_img_s']:>9.0f}"
        )
    print(f"\n{'targets':<22} {'test acc':>8} {'- online':>9} {'paired':>24} {'train s':>8}")
    for name, r in results.items():
        print(
            f"{name:<22} {r['mean']:>8.4f} {r['minus_online']:>+9.4f} "
            f"{str(r['paired_minus_online']):>24} {r['train_s']:>8.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
