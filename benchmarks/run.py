"""Speed of mtkd_jax's distillation, side by side with hand-written JAX (and PyTorch).

Run:  python benchmarks/run.py [--json FILE] [--quick] [--workload standard|gpu]
                               [--dtype float32|bfloat16] [--strategy auto|loop|vmap]
                               [--units distill,student,...] [--no-bf16]

The standard workload (issue 6; keep it fixed so results compare across versions):
batches of 256 N(0, 1) float32 images 32x32x3 with labels in [0, 100), 4 pre-generated
batches rotated; 3 `ConvNet` teachers (different inits, frozen), a `SmallConvNet` student;
T = 4 softmaxes, the pairwise squared-difference matrix, CA-MKD confidence weights, the fused
target, `0.5 CE + 0.5 T^2 KL`, SGD momentum 0.9, lr 0.05, student only. `--workload gpu`:
batch 1024, ResNet-14-like teachers (GroupNorm), a small ResNet student.

Units, in images/s (median over timed repeats after warm-up; compile time apart, as JAX
reports it for the first call: tracing, lowering and XLA compilation):
  teachers              the K teachers' frozen inference (`make_stacked_apply`)
  distill               the library's online distillation step (`make_distill_step`)
  student               a student-only CE step (`make_supervised_step`): the floor
  distill_cached        the distill step reading full float16 logits from the cache
                        (`mtkd_jax.cache`), host lookup and transfer included
  distill_cached_top5   the same from a top-5 cache (reconstructed on the host)
  bare_jax_teachers     the teachers written by hand in JAX (a Python loop)
  bare_jax_distill      the whole step written by hand in JAX/optax (benchmarks/bare_jax.py)
  torch_distill         the same step as a PyTorch CPU loop (benchmarks/torch_loop.py), if
                        torch is installed (standard workload, float32 only)

The bf16 column (`--no-bf16` to skip; off with `--dtype bfloat16`): `teachers`, `distill` and
`student` again under the library's mixed-precision policies (`mtkd_jax.core.precision`): the
student with params float32 and compute bfloat16 (`mixed_bfloat16`), the teachers stored and
run in bfloat16 (`bfloat16`), logits, softmaxes and losses float32; as units `<unit>_bf16`.
`checks.bf16_first_loss_rel_gap` is the first distill loss's relative gap to float32's.

Repeats of all units are interleaved (one repeat of each in turn), so background load hits
every unit alike and the ratios within one run stay meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bare_jax  # noqa: E402
import torch_loop  # noqa: E402

import mtkd_jax  # noqa: E402
from mtkd_jax import cache as mcache  # noqa: E402
from mtkd_jax import models, teachers  # noqa: E402
from mtkd_jax.training import state, steps

TEMPERATURE, ALPHA, LR, MOMENTUM = 4.0, 0.5, 0.05, 0.9
NUM_TEACHERS, NUM_CLASSES, NUM_BATCHES = 3, 100, 4

WORKLOADS = {
    # name: batch, image shape, teacher (name, kwargs), student (name, kwargs)
    "standard": dict(
        batch_size=256,
        image=(32, 32, 3),
        teacher=("convnet", {}),
        student=("small_convnet", {}),
    ),
    "gpu": dict(
        batch_size=1024,
        image=(32, 32, 3),
        teacher=("resnet", dict(widths=(64, 128, 256), blocks=(2, 2, 2))),
        student=("resnet", dict(widths=(32, 64), blocks=(1, 1))),
    ),
}
QUICK = {
    "standard": dict(batch_size=32),
    "gpu": dict(
        batch_size=32,
        image=(16, 16, 3),
        teacher=("resnet", dict(widths=(8, 16), blocks=(1, 1))),
        student=("resnet", dict(widths=(8,), blocks=(1,))),
    ),
}


# ---------------------------------------------------------------------------------------------
# Environment


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    import flax

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "mtkd_jax": mtkd_jax.__version__,
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.local_devices()],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": list(os.getloadavg()),
    }
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    if torch_loop.available():
        info.update(torch_loop.versions())
    return info


# ---------------------------------------------------------------------------------------------
# Workload


def make_batches(batch_size: int, image: tuple, seed: int = 0) -> list[dict]:
    """`NUM_BATCHES` batches of N(0, 1) images and uniform labels, with example indices."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(NUM_BATCHES):
        out.append(
            {
                "x": rng.standard_normal((batch_size, *image), dtype=np.float32),
                "y": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
                "index": np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int64),
            }
        )
    return out


def make_models(cfg: dict, dtype):
    t_name, t_kw = cfg["teacher"]
    s_name, s_kw = cfg["student"]
    teacher = models.make_model(t_name, num_classes=NUM_CLASSES, dtype=dtype, **t_kw)
    student = models.make_model(s_name, num_classes=NUM_CLASSES, dtype=dtype, **s_kw)
    x = jnp.zeros((1, *cfg["image"]), jnp.float32)
    keys = jax.random.split(jax.random.key(1), NUM_TEACHERS + 1)
    teacher_list = [models.init_params(teacher, k, x) for k in keys[:NUM_TEACHERS]]
    student_params = models.init_params(student, keys[-1], x)
    return teacher, student, teacher_list, student_params


def bare_model(name: str, kwargs: dict):
    if name == "convnet":
        return bare_jax.convnet
    if name == "small_convnet":
        return bare_jax.small_convnet
    if name == "resnet":
        return bare_jax.make_resnet(kwargs["widths"], kwargs["blocks"])
    raise ValueError(f"no hand-written version of {name!r}")


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def xla_cost(jitted, *args, **kwargs) -> dict:
    """FLOPs and bytes accessed of one compiled step, from XLA's cost analysis."""
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    args, kwargs = jax.tree.map(spec, (args, kwargs))
    cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return {
        "gflops": round(float(cost.get("flops", 0.0)) / 1e9, 3),
        "gbytes_accessed": round(float(cost.get("bytes accessed", 0.0)) / 1e9, 3),
    }


# ---------------------------------------------------------------------------------------------
# Units: each is `call()` (one step, dispatched), `block()`, and the images one call sees.


class Unit:
    def __init__(self, name: str, images: int, call, block):
        self.name, self.images, self.call, self.block = name, images, call, block
        self.first_call_s = self.compile_s = None
        self.cost = None  # optional: () -> XLA cost analysis of the compiled step
        self.img_s: list[float] = []
        self.steps = 1

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.call()
        self.block()
        return time.perf_counter() - start


def library_units(cfg, dtype, batches, strategy, cache_dir, results, wanted):
    teacher, student, teacher_list, student_params = make_models(cfg, dtype)
    t_apply, s_apply = models.apply_fn_of(teacher), models.apply_fn_of(student)
    tp = teachers.stack_params(teacher_list)
    dev = [{k: jax.device_put(v) for k, v in b.items() if k != "index"} for b in batches]
    t0 = time.perf_counter()
    chosen = strategy
    if strategy == "auto":
        chosen = teachers.choose_strategy(t_apply, tp, dev[0]["x"], num_repeats=1)
    teacher_apply = teachers.make_stacked_apply(t_apply, strategy=chosen)
    teachers_jit = jax.jit(teacher_apply)
    results["strategy"] = {
        "requested": strategy,
        "chosen": chosen,
        "choice_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb_after_choice": round(peak_rss_mb(), 1),
    }
    tx = optax.sgd(LR, momentum=MOMENTUM)
    kw = dict(
        weighting="confidence",
        soft_loss="kl",
        temperature=TEMPERATURE,
        alpha=ALPHA,
        divergence_kind="squared",
    )
    key = jax.random.key(0)
    b = cfg["batch_size"]
    units, first_loss = [], {}

    # (a) teachers
    out = {}
    it = {"i": 0}

    def teachers_call():
        out["z"] = teachers_jit(tp, dev[it["i"] % NUM_BATCHES]["x"])
        it["i"] += 1

    units.append(Unit("teachers", b, teachers_call, lambda: jax.block_until_ready(out["z"])))

    # (b) online distillation
    distill = jax.jit(steps.make_distill_step(s_apply, teacher_apply, tx, **kw), donate_argnums=0)
    st = {"s": state.init_train_state(copy_tree(student_params), tx), "i": 0}

    def distill_call():
        st["s"], m = distill(st["s"], dev[st["i"] % NUM_BATCHES], key, teacher_params=tp)
        first_loss.setdefault("distill", m["loss"])
        st["i"] += 1

    units.append(Unit("distill", b, distill_call, lambda: jax.block_until_ready(st["s"])))
    units[-1].cost = lambda: xla_cost(distill, st["s"], dev[0], key, teacher_params=tp)

    # (c) student only
    sup = jax.jit(steps.make_supervised_step(s_apply, tx), donate_argnums=0)
    ss = {"s": state.init_train_state(copy_tree(student_params), tx), "i": 0}

    def student_call():
        ss["s"], _ = sup(ss["s"], dev[ss["i"] % NUM_BATCHES], key)
        ss["i"] += 1

    units.append(Unit("student", b, student_call, lambda: jax.block_until_ready(ss["s"])))

    # (d) from the cache: built once over the pre-generated examples (timed: build cost)
    n = NUM_BATCHES * b
    caches = {}
    for name, top_k in (("distill_cached", None), ("distill_cached_top5", 5)):
        if name not in wanted:
            continue
        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        c = mcache.build_cache(
            os.path.join(cache_dir, name),
            teacher_apply,
            tp,
            batches,
            num_examples=n,
            top_k=top_k,
            dtype=np.float16,
            progress=False,
            overwrite=True,
        )
        build_s = time.perf_counter() - t0
        caches[name] = c
        results.setdefault("cache", {})[name] = {
            "top_k": top_k,
            "bytes_per_example": c.bytes_per_example,
            "build_s_incl_compile": round(build_s, 3),
            "build_img_s_incl_compile": round(n / build_s, 1),
            "peak_rss_growth_mb": round(peak_rss_mb() - rss0, 1),
        }
    cached = jax.jit(steps.make_distill_step(s_apply, None, tx, **kw), donate_argnums=0)
    for name, c in caches.items():
        cs = {"s": state.init_train_state(copy_tree(student_params), tx), "i": 0}

        def cached_call(cs=cs, c=c, name=name):
            host = batches[cs["i"] % NUM_BATCHES]
            batch = {**dev[cs["i"] % NUM_BATCHES], "teacher_logits": c.lookup(host["index"])}
            cs["s"], m = cached(cs["s"], batch, key)
            first_loss.setdefault(name, m["loss"])
            cs["i"] += 1

        units.append(Unit(name, b, cached_call, lambda cs=cs: jax.block_until_ready(cs["s"])))
    if any(n.endswith("_bf16") for n in wanted):
        units += bf16_units(t_apply, s_apply, tp, chosen, student_params, dev, tx, kw, b,
                            first_loss)
    return units, first_loss, (teacher_list, student_params)


def bf16_units(t_apply, s_apply, tp, strategy, student_params, dev, tx, kw, b, first_loss):
    """`teachers_bf16`, `distill_bf16`, `student_bf16`: the library's mixed-precision policies
    (student params float32 / compute bfloat16; teachers stored and run in bfloat16)."""
    t_model = models.as_model(t_apply, policy="bfloat16")
    s_model = models.as_model(s_apply, policy="mixed_bfloat16")
    tv = models.model_variables(t_model.cast_to_params(tp))  # stacked, stored in bfloat16
    teacher_apply = teachers.make_stacked_apply(t_model, strategy=strategy)
    teachers_jit = jax.jit(teacher_apply)
    key = jax.random.key(0)
    out, it = {}, {"i": 0}

    def teachers_call():
        out["z"] = teachers_jit(tv, dev[it["i"] % NUM_BATCHES]["x"])
        it["i"] += 1

    distill = jax.jit(steps.make_distill_step(s_model, teacher_apply, tx, **kw),
                      donate_argnums=0)
    st = {"s": state.init_train_state(copy_tree(student_params), tx), "i": 0}

    def distill_call():
        st["s"], m = distill(st["s"], dev[st["i"] % NUM_BATCHES], key, teacher_params=tv)
        first_loss.setdefault("distill_bf16", m["loss"])
        st["i"] += 1

    sup = jax.jit(steps.make_supervised_step(s_model, tx), donate_argnums=0)
    ss = {"s": state.init_train_state(copy_tree(student_params), tx), "i": 0}

    def student_call():
        ss["s"], _ = sup(ss["s"], dev[ss["i"] % NUM_BATCHES], key)
        ss["i"] += 1

    units = [
        Unit("teachers_bf16", b, teachers_call, lambda: jax.block_until_ready(out["z"])),
        Unit("distill_bf16", b, distill_call, lambda: jax.block_until_ready(st["s"])),
        Unit("student_bf16", b, student_call, lambda: jax.block_until_ready(ss["s"])),
    ]
    units[1].cost = lambda: xla_cost(distill, st["s"], dev[0], key, teacher_params=tv)
    return units


def bare_units(cfg, dtype, batches, teacher_list, student_params):
    t_fn = bare_model(*cfg["teacher"])
    s_fn = bare_model(*cfg["student"])
    tx = optax.sgd(LR, momentum=MOMENTUM)
    step = jax.jit(
        bare_jax.make_step(t_fn, s_fn, tx, temperature=TEMPERATURE, alpha=ALPHA, dtype=dtype),
        donate_argnums=(0, 1),
    )
    tps = [copy_tree(t) for t in teacher_list]
    dev = [(jax.device_put(b["x"]), jax.device_put(b["y"])) for b in batches]
    params = copy_tree(student_params)
    st = {"p": params, "o": tx.init(params), "i": 0}
    first = {}
    b = cfg["batch_size"]

    def call():
        x, y = dev[st["i"] % NUM_BATCHES]
        st["p"], st["o"], m = step(st["p"], st["o"], tps, x, y)
        first.setdefault("bare_jax_distill", m["loss"])
        st["i"] += 1

    teach = jax.jit(lambda tps, x: jnp.stack([t_fn(p, x, dtype) for p in tps]))
    out = {}
    ti = {"i": 0}

    def teachers_call():
        out["z"] = teach(tps, dev[ti["i"] % NUM_BATCHES][0])
        ti["i"] += 1

    units = [
        Unit("bare_jax_teachers", b, teachers_call, lambda: jax.block_until_ready(out["z"])),
        Unit("bare_jax_distill", b, call, lambda: jax.block_until_ready(st["p"])),
    ]
    units[-1].cost = lambda: xla_cost(step, st["p"], st["o"], tps, *dev[0])
    return units, first


def torch_units(cfg, batches, teacher_list, student_params):
    step, to_input = torch_loop.make_step(
        [jax.device_get(t) for t in teacher_list],
        jax.device_get(student_params),
        temperature=TEMPERATURE,
        alpha=ALPHA,
        lr=LR,
        momentum=MOMENTUM,
    )
    inputs = [to_input(b["x"], b["y"]) for b in batches]
    st = {"i": 0}
    first = {}

    def call():
        loss = step(*inputs[st["i"] % NUM_BATCHES])
        first.setdefault("torch_distill", loss)
        st["i"] += 1

    return [Unit("torch_distill", cfg["batch_size"], call, lambda: None)], first


# ---------------------------------------------------------------------------------------------
# Timing


_COMPILE_S = [0.0]


def _on_event(name: str, seconds: float, **_) -> None:
    # Tracing, lowering and XLA compilation, as JAX itself reports them.
    if name.startswith("/jax/core/compile/"):
        _COMPILE_S[0] += seconds


def measure(units: list[Unit], *, repeats: int, target_s: float, log) -> None:
    """Warm up (the first call compiles), calibrate, then interleaved repeats."""
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    for u in units:
        c0 = _COMPILE_S[0]
        t0 = time.perf_counter()
        u.call()
        u.block()
        u.first_call_s = time.perf_counter() - t0
        u.compile_s = _COMPILE_S[0] - c0
        one = u.run(1)  # a second, compiled call: the calibration
        u.steps = max(1, int(round(target_s / max(one, 1e-6))))
        log(
            f"  {u.name:<22} first call {u.first_call_s:7.2f} s (compile {u.compile_s:.2f} s), "
            f"step {one * 1e3:8.1f} ms, "
            f"{u.steps} step(s)/repeat"
        )
    for r in range(repeats):
        # Reversing the order every other repeat cancels position effects (a unit that
        # always follows the PyTorch loop would inherit its spinning OpenMP threads).
        for u in units if r % 2 == 0 else units[::-1]:
            u.img_s.append(u.steps * u.images / u.run(u.steps))
        log(f"  repeat {r + 1}/{repeats}: load {os.getloadavg()[0]:.2f}")


def summarize(units: list[Unit]) -> dict:
    out = {}
    for u in units:
        med = statistics.median(u.img_s)
        out[u.name] = {
            "img_s": round(med, 2),
            "img_s_min": round(min(u.img_s), 2),
            "img_s_max": round(max(u.img_s), 2),
            "step_ms": round(1e3 * u.images / med, 2),
            "compile_s": round(u.compile_s, 2),
            "first_call_s": round(u.first_call_s, 2),
            "steps_per_repeat": u.steps,
            "repeats": len(u.img_s),
        }
    return out


RATIOS = (
    ("distill", "bare_jax_distill"),
    ("teachers", "bare_jax_teachers"),
    ("distill_cached", "distill"),
    ("distill_cached", "student"),
    ("distill_cached_top5", "student"),
    ("distill", "teachers"),
    ("distill", "torch_distill"),
    ("distill_bf16", "distill"),
    ("teachers_bf16", "teachers"),
    ("student_bf16", "student"),
)


def ratios(units: list[Unit]) -> dict:
    """Throughput ratios, as the median over repeats of the ratio within each repeat.

    The units of one repeat run back to back, so pairing them cancels slow changes of the
    background load; the ratio of the two medians is given next to it.
    """
    by_name = {u.name: u.img_s for u in units}
    out = {}
    for a, b in RATIOS:
        if a in by_name and b in by_name:
            paired = [x / y for x, y in zip(by_name[a], by_name[b], strict=True)]
            out[f"{a} / {b}"] = {
                "paired_median": round(statistics.median(paired), 3),
                "of_medians": round(
                    statistics.median(by_name[a]) / statistics.median(by_name[b]), 3
                ),
            }
    return out


def table(result: dict) -> str:
    units = result["units"]
    bf16 = any(n.endswith("_bf16") for n in units)
    lines = [f"{'unit':<22} {'img/s':>10} {'min':>10} {'max':>10} {'step ms':>9} {'compile s':>9}"
             + (f" {'bf16 img/s':>11}" if bf16 else "")]
    for name, u in units.items():
        if name.endswith("_bf16"):
            continue
        line = (
            f"{name:<22} {u['img_s']:>10.1f} {u['img_s_min']:>10.1f} "
            f"{u['img_s_max']:>10.1f} {u['step_ms']:>9.1f} {u['compile_s']:>9.2f}"
        )
        if bf16:
            other = units.get(f"{name}_bf16")
            line += f" {other['img_s']:>11.1f}" if other else f" {'-':>11}"
        lines.append(line)
    lines.append("")
    lines.append(f"{'ratio':<34} {'paired median':>13} {'of medians':>10}")
    for k, v in result["ratios"].items():
        lines.append(f"{k:<34} {v['paired_median']:>13.3f} {v['of_medians']:>10.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke run)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="standard")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--strategy", choices=teachers.STRATEGIES, default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7)")
    p.add_argument(
        "--target-seconds",
        type=float,
        default=None,
        help="rough duration of one repeat of one unit (default 1.0)",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip the bf16 column (the library's mixed-precision policies)")
    p.add_argument(
        "--units",
        default=None,
        help="comma-separated subset of the units to time, e.g. distill,bare_jax_distill for "
        "a tight A/B comparison (default all)",
    )
    p.add_argument("--cache-dir", default=None, help="where to build the caches (temp dir)")
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="FILE",
        help="print one table from JSON files written by this script and strategy_bench.py "
        "(and write it to --json); runs nothing",
    )
    return p.parse_args(argv)


def summarize_files(paths: list[str]) -> dict:
    """One table over several results (e.g. the runs of `gpu.sh`)."""
    runs, strategy = {}, {}
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        (strategy if "rows" in r else runs)[name] = r
    units = sorted({u for r in runs.values() for u in r["units"]}, key=list(UNIT_ORDER).index)
    names = list(runs)
    lines = [f"{'img/s':<22}" + "".join(f"{n:>16}" for n in names)]
    for u in units:
        cells = [runs[n]["units"].get(u, {}).get("img_s") for n in names]
        lines.append(f"{u:<22}" + "".join(f"{c:>16.1f}" if c else f"{'-':>16}" for c in cells))
    ratio_names = sorted({k for r in runs.values() for k in r["ratios"]})
    for k in ratio_names:
        cells = [runs[n]["ratios"].get(k, {}).get("paired_median") for n in names]
        lines.append(
            f"{k:<34}"[:34].ljust(22) + "".join(f"{c:>16.3f}" if c else f"{'-':>16}" for c in cells)
        )
    for n, r in runs.items():
        lines.append(
            f"{n}: {r['config']}, strategy {r['strategy']['chosen']}, "
            f"devices {r['versions']['devices']}, peak RSS {r['memory']['peak_rss_mb']} MB"
        )
    for n, r in strategy.items():
        lines.append(
            f"{n} ({r['backend']}, {r['dtype']}): worst auto/best {r['worst_auto_over_best']}"
        )
        for row in r["rows"]:
            lines.append(
                f"  {row['model']:<14} B={row['batch']:<5} vmap {row['vmap_ms']:>9.2f} ms "
                f"loop {row['loop_ms']:>9.2f} ms auto {row['auto_ms']:>9.2f} ms "
                f"({row['auto_chose']}) auto/best {row['auto_over_best']:.3f}"
            )
    text = "\n".join(lines)
    print(text)
    return {"runs": runs, "strategy": strategy, "table": text}


UNIT_ORDER = (
    "teachers",
    "distill",
    "student",
    "distill_cached",
    "distill_cached_top5",
    "bare_jax_teachers",
    "bare_jax_distill",
    "torch_distill",
    "teachers_bf16",
    "distill_bf16",
    "student_bf16",
)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.summarize:
        out = summarize_files(args.summarize)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    start = time.perf_counter()
    log = functools.partial(print, file=sys.stderr, flush=True)
    cfg = dict(WORKLOADS[args.workload])
    if args.quick:
        cfg.update(QUICK[args.workload])
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    repeats = args.repeats or (2 if args.quick else 7)
    target_s = args.target_seconds or (0.05 if args.quick else 1.0)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    env = environment()
    log(
        f"mtkd_jax benchmark: workload={args.workload}{' (quick)' if args.quick else ''} "
        f"dtype={args.dtype} batch={cfg['batch_size']} backend={env['backend']}"
    )

    batches = make_batches(cfg["batch_size"], cfg["image"])
    result: dict = {
        "config": {
            "workload": args.workload,
            "quick": args.quick,
            "dtype": args.dtype,
            **{k: cfg[k] for k in cfg},
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        wanted = set(args.units.split(",")) if args.units else set(UNIT_ORDER)
        unknown = wanted - set(UNIT_ORDER)
        if unknown:
            raise SystemExit(f"--units: unknown {sorted(unknown)}; choose from {UNIT_ORDER}")
        if args.no_bf16 or args.dtype == "bfloat16":
            wanted = {u for u in wanted if not u.endswith("_bf16")}
        else:  # the bf16 column of every unit that has one
            wanted |= {f"{u}_bf16" for u in ("teachers", "distill", "student") if u in wanted}
        units, first, (teacher_list, student_params) = library_units(
            cfg, dtype, batches, args.strategy, cache_dir, result, wanted
        )
        bare, bare_first = bare_units(cfg, dtype, batches, teacher_list, student_params)
        units += bare
        use_torch = (
            not args.no_torch
            and torch_loop.available()
            and args.workload == "standard"
            and args.dtype == "float32"
            and "torch_distill" in wanted
        )
        if use_torch:
            tu, torch_first = torch_units(cfg, batches, teacher_list, student_params)
            units += tu
        units = [u for u in units if u.name in wanted]
        measure(units, repeats=repeats, target_s=target_s, log=log)
        first.update(bare_first)
        if use_torch:
            first.update(torch_first)

    # Every implementation starts from the same weights and batch: their first losses must
    # agree (the top-k cache excepted: its target keeps only the top k classes exactly).
    losses = {k: float(v) for k, v in first.items()}
    ref = losses.get("distill")
    same = [v for k, v in losses.items() if not k.endswith(("top5", "_bf16"))]
    result["checks"] = {
        "first_loss": losses,
        "max_rel_diff_vs_library": None
        if ref is None
        else max(abs(v - ref) / abs(ref) for v in same),
        # Mixed precision against float32, from the same weights and batch.
        "bf16_first_loss_rel_gap": None
        if ref is None or "distill_bf16" not in losses
        else abs(losses["distill_bf16"] - ref) / abs(ref),
        # The same work, counted by XLA: a library overhead would show as extra FLOPs/bytes.
        "xla_cost": {u.name: u.cost() for u in units if u.cost is not None},
    }
    result["units"] = summarize(units)
    result["ratios"] = ratios(units)
    env["load_avg_end"] = list(os.getloadavg())
    result["versions"] = env
    result["memory"] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(result))
    print(f"\nchecks: {json.dumps(result['checks'])}")
    print(f"strategy: {result['strategy']}  cache: {json.dumps(result.get('cache'))}")
    print(
        f"peak RSS {result['memory']['peak_rss_mb']} MB, wall {result['wall_s']} s, "
        f"load {env['load_avg_start'][0]:.2f} -> {env['load_avg_end'][0]:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
