"""Language-model distillation: speed and memory of mtkd_jax's token-level step, side by side
with a bare JAX step and a PyTorch loop (issue 26).

Run:  python benchmarks/lm.py [--json FILE] [--quick] [--no-torch] [--repeats N]
                              [--units a,b] [--no-memory] [--no-speed]
                              [--scaling [K,L,V]] [--untimed AXES]
      python benchmarks/lm.py --plot scK.json scLV.json --json scaling.json   # merge + plot
      python benchmarks/lm.py --ab TREE     # this mtkd_jax against TREE/mtkd_jax, paired

`--quick` (the default test, tests/test_benchmarks_lm.py) runs tiny models and the units
lib_online, lib_cached_slots, bare_jax and torch_eager.

The workload is the default `mtkd lm` (`mtkd_jax.experiment.lm.lm_config`): a ``tiny``
transformer student, K = 3 ``small`` teachers (different inits, frozen), V = 8192, rows of
L = 128 tokens, a batch of B = 8 rows (one document per row), T = 1, alpha = 0.5, the
``uniform`` weighting, AdamW (lr 1e-3, weight decay 0.01), the soft loss chunked over 32
positions (the experiment's `chunk_size`). Two pre-generated batches of random tokens
rotate. Units, in tokens/s (median over interleaved repeats after warm-up):

  lib_online            `make_distill_step` with the teachers run online, chunked soft loss:
                        the teachers give features and their heads run per chunk
                        (`mtkd_jax.experiment.lm_run.online_teachers`, as `mtkd lm` does)
  lib_online_stacked    the same with the teachers' whole logits stacked `[K, B, L, V]`
  lib_online_unchunked  the same with the whole `[B, L, V]` student logits (no chunking)
  lib_cached            from a top-32 cache (`build_cache`): `TeacherCache.lookup` rebuilds
                        `[K, B, L, V]` logits on the host (`with_cached_logits`, as `mtkd lm`
                        does), transfer and the chunked step included
  lib_cached_device     from the same cache, the top-k entries sent as they are and expanded
                        on the device one chunk at a time (`expand_top_k` as `teacher_head`)
  lib_cached_slots      from the same cache, the top-k entries sent as they are
                        (`with_cached_top_k`) and never expanded: the slot-space loss
                        (`mtkd_jax.objective.top_k_slots`, ``cache_fill="bucket"`` in `mtkd lm`)
  lib_student           the student's own supervised step (`make_supervised_step`): the floor
  bare_jax              the same step by hand in JAX/optax (`bare_lm.py`): no chunking
  torch_eager           the same step as a PyTorch loop (`torch_lm.py`), in a worker process
  torch_compiled        the same with `torch.compile`

Every unit starts from the same weights (the PyTorch worker gets the JAX params); their first
losses must agree to 1e-4 (relative; `checks`). Each repeat runs every unit once, in an
order reversed every other repeat, so ratios are paired within a repeat (`run.py`'s
`measure` and `ratios`). XLA's FLOP count of each compiled step (`cost_analysis`) and the
achieved GFLOP/s. The work of one step is taken as the unchunked library step's count
(``gflops_work``; XLA costs the chunked steps' `scan` body once),
and every unit's GFLOP/s, the PyTorch ones included, is that work over its step time.

`memory_ratio_128k`: at K = 4, B = 4, L = 4096, V = 131072 (compiled, not run), XLA's
temporary bytes of the chunked against the unchunked step, for precomputed teacher logits,
online teachers with `teacher_head`, and a top-k cache expanded on the device; linear
models stand in for the transformers there (features `[B, L, 256]` and a head) so that the
numbers are those of the loss, not of attention at L = 4096 (see `memory_128k`).

`--scaling`: tokens/s and XLA temporary bytes against K, L and V, online against cached,
and a plot (`lm_scaling.png` beside the JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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
# Appended: a library on PYTHONPATH (another version, `--ab`) comes first.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bare_lm  # noqa: E402
import run as bench  # noqa: E402
from flax import nnx  # noqa: E402
from memory import _features as _lin_features  # noqa: E402  (the linear stand-ins)
from memory import _head as _lin_head  # noqa: E402
from memory import _logits as _lin_logits  # noqa: E402

import mtkd_jax  # noqa: E402
from mtkd_jax.cache import build_cache, expand_top_k  # noqa: E402
from mtkd_jax.models.transformer import Transformer, preset  # noqa: E402
from mtkd_jax.models.zoo.token import token_model_fns  # noqa: E402
from mtkd_jax.training.state import init_train_state  # noqa: E402
from mtkd_jax.training.steps import make_distill_step, make_supervised_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT = dict(student="tiny", teacher="small", K=3, V=8192, L=128, B=8, chunk=32, top_k=32,
               student_kwargs={}, teacher_kwargs={}, llvm_opt_level=None)
# `--quick` is the test of the code paths, not a measurement: its programs are compiled at
# LLVM level 0 (half the compile time, which is most of its run), so its timings are not
# comparable with a full run's.
QUICK = dict(student="tiny", teacher="tiny", K=3, V=512, L=32, B=4, chunk=16, top_k=8,
             student_kwargs=dict(dim=16, depth=1, heads=2, kv_heads=1, mlp_dim=32),
             teacher_kwargs=dict(dim=32, depth=1, mlp_dim=64), llvm_opt_level=0)
MEMORY = dict(K=4, B=4, L=4096, V=131072, H=256, chunk=128, top_k=32)
MEMORY_QUICK = dict(K=2, B=2, L=64, V=512, H=32, chunk=16, top_k=8)
TEMPERATURE, ALPHA, LR, WEIGHT_DECAY = 1.0, 0.5, 1e-3, 0.01
NUM_BATCHES = 2
UNITS = ("lib_online", "lib_online_stacked", "lib_online_unchunked", "lib_cached",
         "lib_cached_device",
         "lib_cached_slots", "lib_student", "bare_jax", "torch_eager", "torch_compiled")
QUICK_UNITS = ("lib_online", "lib_cached_slots", "bare_jax", "torch_eager")
GOALS = {"lib_vs_bare": 0.95, "lib_vs_torch": 1.0, "memory_ratio_128k": 0.05,
         "cached_vs_online": 2.0}


# ---------------------------------------------------------------------------------------------
# Workload


def _compiler_options(cfg: dict) -> dict | None:
    level = cfg.get("llvm_opt_level")
    return None if level is None else {"xla_backend_optimization_level": level}


def make_models(cfg: dict):
    """`(fns_s, params_s, fns_t, [params_t] * K)` of the library's transformers."""
    s_cfg = preset(cfg["student"], vocab_size=cfg["V"], max_len=cfg["L"], **cfg["student_kwargs"])
    t_cfg = preset(cfg["teacher"], vocab_size=cfg["V"], max_len=cfg["L"], **cfg["teacher_kwargs"])
    # Built under one `jit` per config (the key an argument) rather than op by op, which
    # compiles every initializer's shape on its own. Every unit gets these same weights.
    opts = _compiler_options(cfg)

    def builder(c):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0))))
        init = jax.jit(lambda key: nnx.split(Transformer(c, rngs=nnx.Rngs(key)))[1],
                       compiler_options=opts)
        return lambda key: nnx.merge(graphdef, init(key))

    build_s, build_t = builder(s_cfg), builder(t_cfg)
    fns_s, ps = token_model_fns(build_s(jax.random.key(0)))
    fns_t, pt = None, []
    for k in range(cfg["K"]):
        fns_t, p = token_model_fns(build_t(jax.random.key(100 + k)))
        pt.append(p)
    return fns_s, ps, fns_t, pt


def make_batches(cfg: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    b, length, v = cfg["B"], cfg["L"], cfg["V"]
    return [{"x": rng.integers(0, v, (b, length)).astype(np.int32),
             "y": rng.integers(0, v, (b, length)).astype(np.int32),
             "mask": np.ones((b, length), np.float32),
             "index": np.arange(i * b, (i + 1) * b, dtype=np.int64)}
            for i in range(NUM_BATCHES)]


def optimizer():
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


def _pure(params) -> dict:
    return nnx.to_pure_dict(params)


def stack_logits(fns):
    """`mtkd lm`'s online teachers: the K teachers' logits stacked, `[K, B, L, V]`."""
    return lambda tps, x: jnp.stack([fns.logits(p, x) for p in tps])


def _step_batch(b: dict) -> dict:
    return {k: b[k] for k in ("x", "y", "mask")}


class JaxUnit(bench.Unit):
    """A jitted step over rotating batches; `first` keeps its first loss."""

    def __init__(self, name, tokens, fn, state, batches, *, loss_of=lambda m: m["loss"]):
        self.state, self.i, self.first_loss = state, 0, None
        self.fn, self.batches, self.loss_of = fn, batches, loss_of

        def call():
            b = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.state, m = self.fn(self.state, b)
            if self.first_loss is None:
                self.first_loss = float(self.loss_of(m))

        super().__init__(name, tokens, call, lambda: jax.block_until_ready(self.state))


class TorchUnit(bench.Unit):
    """One unit of a worker process (`torch_lm.py`, `--serve`): timed inside the worker."""

    def __init__(self, name, tokens, worker, mode):
        self.worker, self.mode = worker, mode
        super().__init__(name, tokens, lambda: self.run(1), lambda: None)

    def run(self, n: int) -> float:
        return self.worker.ask(f"run {self.mode} {n}")["seconds"]


AB_UNITS = ("lib_online", "lib_online_unchunked", "lib_cached_device")


def serve(cfg: dict, wanted) -> None:
    """`--serve`: build `wanted` units with the mtkd_jax on the path, warm them up, then
    answer `run <unit> <n>` with the seconds of n steps (the `--ab` worker)."""
    with tempfile.TemporaryDirectory() as tmp:
        units, _, _ = build_units(cfg, tmp, use_torch=False, wanted=set(wanted))
        by = {u.name: u for u in units}
        for u in units:
            u.call()
            u.block()
        print(json.dumps({"ready": True, "mtkd_jax": os.path.dirname(mtkd_jax.__file__),
                          "first": {u.name: u.first_loss for u in units}}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            print(json.dumps({"seconds": by[cmd[1]].run(int(cmd[2]))}), flush=True)


def ab(cfg: dict, before: str, *, repeats: int, target_s: float, quick: bool, log) -> dict:
    """The library at `before` (a source tree holding `mtkd_jax/`) against this one: the same
    units in two worker processes, interleaved repeats, paired ratios (after / before)."""
    units = []
    workers = {}
    try:
        for tag, path in (("before", before), ("after", os.path.dirname(HERE))):
            env = {**os.environ, "PYTHONPATH": path}
            argv = [sys.executable, os.path.abspath(__file__), "--serve", *(
                ["--quick"] if quick else [])]
            workers[tag] = w = Worker(argv, env=env)
            log(f"  {tag}: {w.info['mtkd_jax']}")
            for name in AB_UNITS:
                u = TorchUnit(f"{name}@{tag}", cfg["B"] * cfg["L"], w, name)
                u.first_loss = w.info["first"][name]
                units.append(u)
        bench.measure(units, repeats=repeats, target_s=target_s, log=log)
    finally:
        for w in workers.values():
            w.close()
    summary = bench.summarize(units)
    return {"units": {n: {"tok_s": s["img_s"], "step_ms": s["step_ms"]}
                      for n, s in summary.items()},
            "first_loss": {u.name: u.first_loss for u in units},
            "after_over_before": {n: paired(units, f"{n}@after", f"{n}@before")
                                  for n in AB_UNITS}}


class Worker:
    """A child process answering one JSON line per command line (`torch_lm.py`, `--serve`)."""

    def __init__(self, argv, env=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self._info = None

    @property
    def info(self) -> dict:
        """The worker's first line, read when first needed: it starts up (imports torch)
        while this process goes on compiling."""
        if self._info is None:
            self._info = self._read()
        return self._info

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker {self.proc.args[1]} exited")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"worker: {out['error']}")
        return out

    def ask(self, cmd: str) -> dict:
        self.info  # noqa: B018 (its first line comes before any answer)
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


class TorchWorker(Worker):
    """`torch_lm.py` in a subprocess, fed the JAX params and the batches through an .npz."""

    def __init__(self, cfg, ps, pts, batches, tmp: str):
        arrays = {"config": json.dumps(dict(temperature=TEMPERATURE, alpha=ALPHA, lr=LR,
                                            weight_decay=WEIGHT_DECAY, teachers=len(pts),
                                            batches=len(batches)))}
        for who, p in [("student", ps)] + [(f"teacher{i}", p) for i, p in enumerate(pts)]:
            for path, a in jax.tree_util.tree_flatten_with_path(_pure(p))[0]:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                arrays[f"{who}|{name}"] = np.asarray(a)
        for i, b in enumerate(batches):
            for f in ("x", "y", "mask"):
                arrays[f"batch{i}_{f}"] = b[f]
        path = os.path.join(tmp, "torch_setup.npz")
        np.savez(path, **arrays)
        super().__init__([sys.executable, os.path.join(HERE, "torch_lm.py"), path])


def torch_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def cached_device_step(fns_s, tx, cfg):
    """The distill step reading a top-k cache's compact entries, expanded on the device one
    chunk at a time: the entries `[K, B, L, 2k + 1]` (log-probs, classes, log of the rest)
    travel as `teacher_params`; `teacher_apply` hands them on, `teacher_head` expands a
    chunk (`expand_top_k`)."""
    v, k = cfg["V"], cfg["top_k"]

    def expand(_, packed):  # [K, B, c, 2k + 1] -> [K, B, c, V]
        return expand_top_k(packed[..., :k], packed[..., k:2 * k].astype(jnp.int32),
                            packed[..., 2 * k], num_classes=v)

    return make_distill_step(fns_s.features, lambda tp, x: tp, tx, student_head=fns_s.head,
                             teacher_head=expand, chunk_size=cfg["chunk"],
                             temperature=TEMPERATURE, alpha=ALPHA, weighting="uniform")


def pack_top_k(top) -> np.ndarray:
    """A `TopK` of the cache -> `[K, B, L, 2k + 1]` float32 (classes exact below 2^24)."""
    return np.concatenate([np.asarray(top.log_probs, np.float32),
                           np.asarray(top.classes, np.float32),
                           np.asarray(top.log_rest, np.float32)[..., None]], axis=-1)


def build_units(cfg, tmp, *, use_torch: bool, wanted=None):
    """The units of one run and what they were built from."""
    fns_s, ps, fns_t, pts = make_models(cfg)
    batches = make_batches(cfg)
    # Started first: it imports torch while this process builds the cache and the steps.
    worker = TorchWorker(cfg, ps, pts, batches, tmp) if use_torch else None
    tokens = cfg["B"] * cfg["L"]
    tx = optimizer()
    tp = tuple(pts)
    teacher_fn = stack_logits(fns_t)
    common = dict(temperature=TEMPERATURE, alpha=ALPHA, weighting="uniform")
    dev = [jax.device_put(_step_batch(b)) for b in batches]
    key = jax.random.key(0)
    units, costs = [], {}
    want = lambda name: wanted is None or name in wanted  # noqa: E731
    jit = functools.partial(jax.jit, compiler_options=_compiler_options(cfg))

    def lib(name, step, batches, **kw):
        jitted = jit(step)
        fn = lambda st, b: jitted(st, b, key, **kw)  # noqa: E731
        state = init_train_state(jax.tree.map(jnp.copy, ps), tx)
        costs[name] = lambda: bench.xla_cost(jitted, state, batches[0], key, **kw)
        return JaxUnit(name, tokens, fn, state, batches)

    try:
        from mtkd_jax.experiment.lm_run import online_teachers
        t_apply, t_head = online_teachers(fns_t)
    except ImportError:  # an `--ab` tree from before the chunked teacher heads
        t_apply, t_head = teacher_fn, None
    online = make_distill_step(fns_s.features, t_apply, tx, student_head=fns_s.head,
                               teacher_head=t_head, chunk_size=cfg["chunk"], **common)
    units.append(lib("lib_online", online, dev, teacher_params=tp))
    if want("lib_online_stacked"):
        stacked = make_distill_step(fns_s.features, teacher_fn, tx, student_head=fns_s.head,
                                    chunk_size=cfg["chunk"], **common)
        units.append(lib("lib_online_stacked", stacked, dev, teacher_params=tp))
    plain = make_distill_step(fns_s.logits, teacher_fn, tx, **common)
    if want("lib_online_unchunked"):
        units.append(lib("lib_online_unchunked", plain, dev, teacher_params=tp))

    # The top-k cache of the batches' rows, as `mtkd lm` builds it.
    cache = build_cache(os.path.join(tmp, "cache"), teacher_fn, tp,
                        [dict(b) for b in batches], num_examples=NUM_BATCHES * cfg["B"],
                        top_k=cfg["top_k"], progress=False)
    cached = jit(make_distill_step(fns_s.features, None, tx, student_head=fns_s.head,
                                       chunk_size=cfg["chunk"], **common))
    st = init_train_state(jax.tree.map(jnp.copy, ps), tx)

    def host_fn(state, b):  # with_cached_logits: lookup, expand on the host, transfer
        return cached(state, {**_step_batch(b), "teacher_logits": cache.lookup(b["index"])},
                      key)

    units.append(JaxUnit("lib_cached", tokens, host_fn, st, batches))
    costs["lib_cached"] = lambda: bench.xla_cost(
        cached, st, {**dev[0], "teacher_logits": cache.lookup(batches[0]["index"])}, key)

    dstep = jit(cached_device_step(fns_s, tx, cfg))
    st = init_train_state(jax.tree.map(jnp.copy, ps), tx)

    def device_fn(state, b):  # only the top-k entries travel
        packed = pack_top_k(cache.lookup_top_k(b["index"]))
        return dstep(state, _step_batch(b), key, teacher_params=packed)

    if want("lib_cached_device"):
        units.append(JaxUnit("lib_cached_device", tokens, device_fn, st, batches))
        costs["lib_cached_device"] = lambda: bench.xla_cost(
            dstep, st, dev[0], key, teacher_params=pack_top_k(cache.lookup_top_k(
                batches[0]["index"])))

    st = init_train_state(jax.tree.map(jnp.copy, ps), tx)

    def slots_fn(state, b):  # with_cached_top_k: the entries as stored, never expanded
        return cached(state, {**_step_batch(b), "teacher_top_k": cache.lookup_top_k(
            b["index"])}, key)

    units.append(JaxUnit("lib_cached_slots", tokens, slots_fn, st, batches))
    costs["lib_cached_slots"] = lambda: bench.xla_cost(
        cached, st, {**dev[0], "teacher_top_k": cache.lookup_top_k(batches[0]["index"])}, key)

    if want("lib_student"):
        units.append(lib("lib_student", make_supervised_step(fns_s.logits, tx), dev))

    bare = jit(bare_lm.make_step(tx, temperature=TEMPERATURE, alpha=ALPHA))
    bp, btp = _pure(ps), [_pure(p) for p in pts]
    bstate = (jax.tree.map(jnp.copy, bp), tx.init(bp))

    def bare_fn(state, b):
        p, o, m = bare(state[0], state[1], btp, b["x"], b["y"], b["mask"])
        return (p, o), m

    units.append(JaxUnit("bare_jax", tokens, bare_fn, bstate, dev))
    costs["bare_jax"] = lambda: bench.xla_cost(bare, bp, bstate[1], btp, dev[0]["x"],
                                               dev[0]["y"], dev[0]["mask"])
    if use_torch:
        for mode in [m for m in ("eager", "compiled") if want(f"torch_{m}")]:
            u = TorchUnit(f"torch_{mode}", tokens, worker, mode)
            try:
                u.first_loss = worker.ask(f"first {mode}")["loss"]
            except RuntimeError as e:
                print(f"  torch_{mode} skipped: {e}", file=sys.stderr)
                continue
            units.append(u)
    units = [u for u in units if want(u.name)]
    return units, costs, worker


RATIOS = (
    ("lib_online", "bare_jax"),
    ("lib_online_unchunked", "bare_jax"),
    ("lib_online", "lib_online_unchunked"),
    ("lib_online", "lib_online_stacked"),
    ("lib_online", "torch_eager"),
    ("lib_online", "torch_compiled"),
    ("lib_online_unchunked", "torch_compiled"),
    ("lib_cached", "lib_online"),
    ("lib_cached_device", "lib_online"),
    ("lib_cached_slots", "lib_online"),
    ("lib_cached_slots", "lib_student"),
    ("lib_online", "lib_student"),
    ("bare_jax", "torch_eager"),
)


def paired(units, a: str, b: str) -> dict | None:
    by = {u.name: u.img_s for u in units}
    if a not in by or b not in by:
        return None
    r = [x / y for x, y in zip(by[a], by[b], strict=True)]
    return {"paired_median": round(statistics.median(r), 3),
            "of_medians": round(statistics.median(by[a]) / statistics.median(by[b]), 3),
            "per_repeat": [round(x, 3) for x in r]}


def speed(cfg, *, repeats, target_s, use_torch, log, wanted=None, quick=False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        units, costs, worker = build_units(cfg, tmp, use_torch=use_torch, wanted=wanted)
        try:
            bench.measure(units, repeats=repeats, target_s=target_s, log=log)
        finally:
            if worker is not None:
                worker.close()
        summary = bench.summarize(units)
        for u in units:
            s = summary[u.name]
            s["tok_s"] = s.pop("img_s")
            s["tok_s_min"], s["tok_s_max"] = s.pop("img_s_min"), s.pop("img_s_max")
            s["first_loss"] = u.first_loss
            if u.name in costs and not quick:  # (each compiles its step again: seconds)
                try:
                    s["xla"] = costs[u.name]()
                except Exception as e:  # noqa: BLE001 (a cost analysis is optional)
                    s["xla"] = {"error": f"{type(e).__name__}: {e}"}
        work = next((summary[n]["xla"].get("gflops") for n in ("lib_online_unchunked", "bare_jax")
                     if "gflops" in summary.get(n, {}).get("xla", {})), None)
        for s in summary.values():
            if work:
                s["gflops_work"] = work
                s["achieved_gflop_s"] = round(work * s["tok_s"] / (cfg["B"] * cfg["L"]), 2)
        ratios = {f"{a} / {b}": r for a, b in RATIOS if (r := paired(units, a, b))}
        ref = summary.get("lib_online_unchunked", summary.get("bare_jax", {})).get("first_loss")
        checks = {}
        for name in ("lib_online", "bare_jax", "torch_eager", "torch_compiled"):
            if name in summary and ref:
                checks[f"{name}_first_loss_rel_gap"] = abs(summary[name]["first_loss"] - ref
                                                           ) / abs(ref)
        info = worker.info if worker is not None else {}
    return {"units": summary, "ratios": ratios, "checks": checks, "torch": info}


# ---------------------------------------------------------------------------------------------
# Memory at a real vocabulary (compile only)


def _t_features(tp, x):  # [K, B, L, H]
    return jnp.tanh(jnp.einsum("blh,khg->kblg", x, tp["body"]))


def _t_head(tp, f):  # [K, B, c, H] -> [K, B, c, V]
    return jnp.einsum("kbch,khv->kbcv", f, tp["head"])


def memory_steps(s: dict):
    """`{variant: {"unchunked"|"chunked": (step, extra batch, teacher_params)}}` as shapes."""
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    k, b, length, v, h, top = s["K"], s["B"], s["L"], s["V"], s["H"], s["top_k"]
    tx = optax.sgd(0.1)
    kw = dict(temperature=TEMPERATURE, alpha=ALPHA, weighting="uniform")
    ch = dict(student_head=_lin_head, chunk_size=s["chunk"])
    tparams = {"body": sd((k, h, h), f32), "head": sd((k, h, v), f32)}
    packed = sd((k, b, length, 2 * top + 1), f32)
    top_k = _top_k_shapes(k, b, length, top)

    def expand(packed):
        return expand_top_k(packed[..., :top], packed[..., top:2 * top].astype(jnp.int32),
                            packed[..., 2 * top], num_classes=v)

    return tx, {
        "precomputed_logits": {
            "unchunked": (make_distill_step(_lin_logits, None, tx, **kw),
                          {"teacher_logits": sd((k, b, length, v), f32)}, None),
            "chunked": (make_distill_step(_lin_features, None, tx, **kw, **ch),
                        {"teacher_logits": sd((k, b, length, v), f32)}, None),
        },
        "online_teacher_head": {
            "unchunked": (make_distill_step(_lin_logits, lambda tp, x: _t_head(
                tp, _t_features(tp, x)), tx, **kw), {}, tparams),
            "chunked": (make_distill_step(_lin_features, _t_features, tx, **kw, **ch,
                                          teacher_head=_t_head), {}, tparams),
        },
        "top_k_cache": {
            "unchunked": (make_distill_step(_lin_logits, lambda tp, x: expand(tp), tx, **kw),
                          {}, packed),
            "chunked": (make_distill_step(_lin_features, lambda tp, x: tp, tx, **kw, **ch,
                                          teacher_head=lambda _, z: expand(z)), {}, packed),
        },
        "top_k_slots": {
            "unchunked": (make_distill_step(_lin_logits, None, tx, **kw), {"teacher_top_k": top_k},
                          None),
            "chunked": (make_distill_step(_lin_features, None, tx, **kw, **ch),
                        {"teacher_top_k": top_k}, None),
        },
    }


# The memory programs are compiled, never run: LLVM's optimisation level changes their machine
# code, not XLA's buffer assignment (the same temporary bytes at the quick and the V = 128k
# sizes, checked), and level 0 compiles them in a third less time.
MEMORY_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def compiled_memory(step, state, batch, key, teacher_params) -> dict:
    t0 = time.perf_counter()
    kw = {} if teacher_params is None else {"teacher_params": teacher_params}
    m = jax.jit(step, donate_argnums=0).lower(state, batch, key, **kw).compile(
        compiler_options=MEMORY_COMPILER_OPTIONS).memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 2)}


def memory_128k(s: dict, log) -> dict:
    sd = jax.ShapeDtypeStruct
    tx, variants = memory_steps(s)
    params = {"body": sd((s["H"], s["H"]), jnp.float32),
              "head": sd((s["H"], s["V"]), jnp.float32)}
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    base = {"x": sd((s["B"], s["L"], s["H"]), jnp.float32),
            "y": sd((s["B"], s["L"]), jnp.int32), "mask": sd((s["B"], s["L"]), jnp.float32)}
    one_chunk = (s["K"] + 2) * s["B"] * s["chunk"] * s["V"] * 4
    out = {"size": s, "one_chunk_bytes": one_chunk,
           "one_chunk_formula": "(K + 2) * B * chunk * V * 4"}
    for name, pair in variants.items():
        row = {}
        for kind, (step, extra, tp) in pair.items():
            try:
                row[kind] = compiled_memory(step, state, {**base, **extra}, key, tp)
            except Exception as e:  # noqa: BLE001 (e.g. a backend that refuses to compile it)
                row[kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"  memory {name} {kind}: {row[kind]['error']}")
                continue
            log(f"  memory {name} {kind}: temp {row[kind]['temp_bytes'] / 2**30:.3f} GiB "
                f"(compile {row[kind]['compile_s']} s)")
        if all("temp_bytes" in row[kind] for kind in pair):
            row["ratio"] = round(row["chunked"]["temp_bytes"] / row["unchunked"]["temp_bytes"],
                                 4)
            row["chunked_over_one_chunk"] = round(row["chunked"]["temp_bytes"] / one_chunk, 3)
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# Scaling


SCALING_TIMED = dict(K=(1, 2, 4, 8), L=(128, 256), V=(8192, 16384))
SCALING_MEMORY = dict(K=(1, 2, 4, 8), L=(256, 1024, 4096), V=(8192, 32768, 131072))


def scaling(base: dict, *, repeats: int, log, quick: bool, axes=("K", "L", "V"),
            timed_axes=("K", "L", "V")) -> dict:
    """Timed tokens/s of the online and cached (device-expanded) steps against K, L and V
    (each varied alone from `base`), where a step is short on this CPU; compiled temporary
    bytes of the same steps over the wider grid (no run)."""
    timed = {"K": (1, 2), "L": (16, 32), "V": (256, 512)} if quick else SCALING_TIMED
    mem = {"K": (1, 2), "L": (32, 64), "V": (256, 512)} if quick else SCALING_MEMORY
    timed = {a: v for a, v in timed.items() if a in axes and a in timed_axes}
    mem = {a: v for a, v in mem.items() if a in axes}
    out = {"timed": [], "memory": []}
    wanted = {"lib_online", "lib_cached_slots"}
    for axis, values in timed.items():
        for value in values:
            cfg = {**base, axis: value}
            log(f"scaling: {axis}={value}")
            r = speed(cfg, repeats=repeats, target_s=0.05 if quick else 0.5,
                      use_torch=False, log=log, wanted=wanted)
            row = {"axis": axis, "value": value,
                   **{n: r["units"][n]["tok_s"] for n in wanted},
                   "cached_over_online": r["ratios"]["lib_cached_slots / lib_online"][
                       "paired_median"]}
            out["timed"].append(row)
    for axis, values in mem.items():
        for value in values:
            cfg = {**base, axis: value}
            out["memory"].append({"axis": axis, "value": value,
                                  **step_memory(cfg)})
    return out


def step_memory(cfg: dict) -> dict:
    """Compiled temporary bytes of the transformer online and cached steps at `cfg`."""
    fns_s, ps, fns_t, pts = make_models({**cfg, "K": 1})
    tx = optimizer()
    key = jax.eval_shape(lambda: jax.random.key(0))
    sd = jax.ShapeDtypeStruct
    state = jax.eval_shape(lambda p: init_train_state(p, tx), ps)
    tps = tuple(jax.eval_shape(lambda p: p, pts[0]) for _ in range(cfg["K"]))
    batch = {"x": sd((cfg["B"], cfg["L"]), jnp.int32), "y": sd((cfg["B"], cfg["L"]), jnp.int32),
             "mask": sd((cfg["B"], cfg["L"]), jnp.float32)}
    online = make_distill_step(fns_s.features, stack_logits(fns_t), tx, student_head=fns_s.head,
                               chunk_size=cfg["chunk"], temperature=TEMPERATURE, alpha=ALPHA)
    top = _top_k_shapes(cfg["K"], cfg["B"], cfg["L"], cfg["top_k"])
    cached = make_distill_step(fns_s.features, None, tx, student_head=fns_s.head,
                               chunk_size=cfg["chunk"], temperature=TEMPERATURE, alpha=ALPHA)
    return {"online_temp_bytes": compiled_memory(online, state, batch, key, tps)["temp_bytes"],
            "cached_temp_bytes": compiled_memory(cached, state, {**batch, "teacher_top_k": top},
                                                 key, None)["temp_bytes"]}


def _top_k_shapes(k: int, b: int, length: int, top: int):
    """Shapes of a batch's top-k entries as `with_cached_top_k` gives them (stored dtypes)."""
    sd = jax.ShapeDtypeStruct
    return (sd((k, b, length, top), jnp.float16), sd((k, b, length, top), jnp.int16),
            sd((k, b, length), jnp.float16))


def plot_scaling(sc: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [a for a in ("K", "L", "V")
               if any(r["axis"] == a for r in sc["timed"] + sc["memory"])]
    fig, axes = plt.subplots(2, len(present), figsize=(4.4 * len(present), 7), squeeze=False)
    for j, axis in enumerate(present):
        rows = [r for r in sc["timed"] if r["axis"] == axis]
        ax = axes[0, j]
        for name, label in (("lib_online", "online"), ("lib_cached_slots", "top-k cache")):
            ax.plot([r["value"] for r in rows], [r[name] for r in rows], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"speed against {axis}")
        ax.legend()
        rows = [r for r in sc["memory"] if r["axis"] == axis]
        ax = axes[1, j]
        for name, label in (("online_temp_bytes", "online"),
                            ("cached_temp_bytes", "top-k cache")):
            ax.plot([r["value"] for r in rows], [r[name] / 2**20 for r in rows], "o-",
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("XLA temporary MiB")
        ax.set_title(f"step memory against {axis}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Main


def environment() -> dict:
    import flax

    return {"mtkd_jax": mtkd_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "cpu": bench.cpu_model(),
            "cpu_count": os.cpu_count(), "load_avg_start": list(os.getloadavg())}


def goals(result: dict) -> dict:
    if "speed" not in result:
        return {}
    sp = result["speed"]
    r = sp["ratios"]

    def pm(key):
        return r.get(key, {}).get("paired_median")

    torch_keys = [k for k in ("lib_online / torch_eager", "lib_online / torch_compiled")
                  if k in r]
    out = {
        "lib_vs_bare": {"ratio": pm("lib_online / bare_jax"),
                        "ratio_unchunked": pm("lib_online_unchunked / bare_jax"),
                        "goal": GOALS["lib_vs_bare"],
                        **{f"{n}_tok_s": sp["units"][n]["tok_s"]
                           for n in ("lib_online", "lib_online_unchunked", "bare_jax")
                           if n in sp["units"]}},
        "lib_vs_torch": {"ratio_vs_best": min((pm(k) for k in torch_keys), default=None),
                         **{k: pm(k) for k in torch_keys}, "goal": GOALS["lib_vs_torch"],
                         "torch_tok_s": {n: sp["units"][n]["tok_s"] for n in
                                         ("torch_eager", "torch_compiled") if n in sp["units"]}},
        "cached_vs_online": {"ratio": pm("lib_cached_slots / lib_online"),
                             "ratio_host_expand": pm("lib_cached / lib_online"),
                             "ratio_device_expand": pm("lib_cached_device / lib_online"),
                             "goal": GOALS["cached_vs_online"]},
    }
    if "memory_128k" in result:
        m = result["memory_128k"]
        out["memory_ratio_128k"] = {
            **{name: {"ratio": m[name].get("ratio"),
                      "chunked_over_one_chunk": m[name].get("chunked_over_one_chunk")}
               for name in ("precomputed_logits", "online_teacher_head", "top_k_cache",
                            "top_k_slots")},
            "goal": GOALS["memory_ratio_128k"], "one_chunk_bytes": m["one_chunk_bytes"]}
    if "scaling" in result:
        out["cached_vs_online"].update(scaling_goals(result["scaling"]))
    return out


def scaling_goals(sc: dict) -> dict:
    """From the K rows of a scaling grid: the cached step over the online one at K = 4, and
    the spread (max / min) of the cached step's tokens/s over K (goal: within 1.3x)."""
    rows = [x for x in sc["timed"] if x["axis"] == "K"]
    c = [x["lib_cached_slots"] for x in rows]
    at4 = [x["cached_over_online"] for x in rows if x["value"] == 4]
    return {"flat_in_K": round(max(c) / min(c), 3) if c else None,
            "cached_over_online_at_K4": at4[0] if at4 else None, "flat_goal": 1.3}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the default test)")
    p.add_argument("--scaling", nargs="?", const="K,L,V", default=None, metavar="AXES",
                   help="also the scaling grid over K, L and V (or the comma-separated axes "
                   "given: one axis per run keeps each run short)")
    p.add_argument("--untimed", default="", metavar="AXES",
                   help="scaling axes measured by compiled memory only (not timed)")
    p.add_argument("--plot", nargs="+", metavar="FILE", default=None,
                   help="only plot the scaling rows of these JSON files (merged) to --json's "
                   "`_scaling.png`; runs nothing")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the V = 128k memory part")
    p.add_argument("--no-speed", action="store_true",
                   help="skip the speed comparison (e.g. with --scaling K)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--target-seconds", type=float, default=None)
    p.add_argument("--ab", metavar="TREE", default=None,
                   help="only the library's own units, this tree's mtkd_jax against the one in "
                   "TREE (e.g. `git archive <commit> mtkd_jax | tar -x -C TREE`)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--units", default=None,
                   help=f"comma-separated subset of {','.join(UNITS)} (default all; "
                   f"--quick: {','.join(QUICK_UNITS)})")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)
    start = time.perf_counter()
    cfg = dict(QUICK if args.quick else DEFAULT)
    repeats = args.repeats or (2 if args.quick else 7)
    target_s = args.target_seconds or (0.02 if args.quick else 1.0)
    use_torch = not args.no_torch and torch_available()
    result: dict = {"config": {**cfg, "quick": args.quick, "temperature": TEMPERATURE,
                               "alpha": ALPHA, "weighting": "uniform", "lr": LR},
                    "environment": environment()}
    if args.plot:
        merged = {"timed": [], "memory": []}
        for path in args.plot:
            with open(path) as f:
                sc = json.load(f)["scaling"]
            for k in merged:
                merged[k] += sc[k]
        png = os.path.splitext(args.json or "lm.json")[0] + "_scaling.png"
        merged["plot"] = plot_scaling(merged, png)
        merged["goals"] = scaling_goals(merged)
        print(json.dumps(merged["goals"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"scaling": merged}, f, indent=1)
        return {"scaling": merged}
    if args.serve:
        serve(cfg, AB_UNITS)
        return {}
    log(f"lm benchmark: {cfg}")
    if args.ab:
        result["ab"] = ab(cfg, args.ab, repeats=repeats, target_s=target_s, quick=args.quick,
                          log=log)
        print(json.dumps(result["ab"]["after_over_before"], indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=float)
        return result
    wanted = set(args.units.split(",")) if args.units else set(
        QUICK_UNITS if args.quick else UNITS)
    if wanted - set(UNITS):
        raise SystemExit(f"--units: unknown {sorted(wanted - set(UNITS))}; choose from {UNITS}")
    if not args.no_speed:
        result["speed"] = speed(cfg, repeats=repeats, target_s=target_s, quick=args.quick,
                                use_torch=use_torch and bool(wanted & {"torch_eager",
                                                                       "torch_compiled"}),
                                log=log, wanted=wanted)
    if not args.no_memory:
        result["memory_128k"] = memory_128k(MEMORY_QUICK if args.quick else MEMORY, log)
    if args.scaling:
        result["scaling"] = scaling(cfg, repeats=2 if args.quick else 3, log=log,
                                    quick=args.quick, axes=tuple(args.scaling.split(",")),
                                    timed_axes=tuple(a for a in "KLV"
                                                     if a not in args.untimed.split(",")))
        if args.json:  # the numbers first, then the plot
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=float)
            png = os.path.splitext(args.json)[0] + "_scaling.png"
            result["scaling"]["plot"] = plot_scaling(result["scaling"], png)
    result.update(goals(result))
    result["environment"]["load_avg_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: result[k] for k in GOALS if k in result}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return result


if __name__ == "__main__":
    main()
