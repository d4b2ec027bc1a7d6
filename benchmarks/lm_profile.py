"""Where the time of `benchmarks/lm.py`'s online distill step goes (issue 26): the step against
its pieces, timed in one process with interleaved repeats (`run.py`'s `measure`).

Run:  python benchmarks/lm_profile.py [--json FILE] [--quick] [--repeats N]

Units (tokens/s, the `lm.py` workload):
  teachers          the K teachers' stacked logits alone (`jax.jit` of the teacher function)
  student           the student's supervised step (`make_supervised_step`)
  distill_given     the chunked distill step with the teachers' logits precomputed on the
                    device (student + loss, no teacher forward)
  distill_given_unchunked   the same, whole `[B, L, V]` logits
  distill_online    the chunked step with the teachers run inside it (`lm.py`'s lib_online)

Shares of the online step's time: teachers ~ 1/teachers, loss ~ 1/distill_given - 1/student
(each as a fraction of 1/distill_online).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lm  # noqa: E402
import run as bench  # noqa: E402

from mtkd_jax.training.state import init_train_state  # noqa: E402
from mtkd_jax.training.steps import make_distill_step, make_supervised_step  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target-seconds", type=float, default=0.5)
    args = p.parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)
    cfg = dict(lm.QUICK if args.quick else lm.DEFAULT)
    fns_s, ps, fns_t, pts = lm.make_models(cfg)
    tp = tuple(pts)
    tx = lm.optimizer()
    key = jax.random.key(0)
    tokens = cfg["B"] * cfg["L"]
    dev = [jax.device_put(lm._step_batch(b)) for b in lm.make_batches(cfg)]
    teacher_fn = jax.jit(lm.stack_logits(fns_t))
    given = [{**b, "teacher_logits": teacher_fn(tp, b["x"])} for b in dev]
    kw = dict(temperature=lm.TEMPERATURE, alpha=lm.ALPHA, weighting="uniform")

    def step_unit(name, step, batches, **extra):
        jitted = jax.jit(step)
        state = init_train_state(jax.tree.map(jnp.copy, ps), tx)
        return lm.JaxUnit(name, tokens, lambda st, b: jitted(st, b, key, **extra), state,
                          batches)

    t_out = {}

    def teachers_call(i=[0]):  # noqa: B006 (a counter)
        t_out["z"] = teacher_fn(tp, dev[i[0] % len(dev)]["x"])
        i[0] += 1

    units = [
        bench.Unit("teachers", tokens, teachers_call, lambda: jax.block_until_ready(t_out)),
        step_unit("student", make_supervised_step(fns_s.logits, tx), dev),
        step_unit("distill_given", make_distill_step(
            fns_s.features, None, tx, student_head=fns_s.head, chunk_size=cfg["chunk"], **kw),
            given),
        step_unit("distill_given_unchunked", make_distill_step(fns_s.logits, None, tx, **kw),
                  given),
        step_unit("distill_online", make_distill_step(
            fns_s.features, lm.stack_logits(fns_t), tx, student_head=fns_s.head,
            chunk_size=cfg["chunk"], **kw), dev, teacher_params=tp),
    ]
    bench.measure(units, repeats=args.repeats, target_s=args.target_seconds, log=log)
    s = {n: v["step_ms"] for n, v in bench.summarize(units).items()}
    online = s["distill_online"]
    out = {
        "config": cfg, "step_ms": s,
        "share_of_online": {
            "teachers": round(s["teachers"] / online, 3),
            "student": round(s["student"] / online, 3),
            "loss_chunked": round((s["distill_given"] - s["student"]) / online, 3),
            "loss_unchunked": round((s["distill_given_unchunked"] - s["student"]) / online, 3),
        },
        "ratios": {f"{a} / {b}": lm.paired(units, a, b) for a, b in (
            ("distill_given", "distill_given_unchunked"), ("distill_online", "distill_given"),
            ("distill_given", "student"))},
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
