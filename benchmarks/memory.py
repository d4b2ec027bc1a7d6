"""Peak memory and speed of the token-level distill step: chunked vs unchunked loss.

Run:  python benchmarks/memory.py [--json FILE] [--quick]

Memory: `make_distill_step` is compiled (not run) at K = 4 teachers, B = 8 sequences of
L = 2048 tokens, V = 32000, float32, precomputed teacher logits `[K, B, L, V]` in the batch,
a student with features `[B, L, H]` (H = 256) and an output head `[H, V]`; XLA's memory
analysis of the compiled program (`jax.jit(step).lower(...).compile().memory_analysis()`)
gives its temporary bytes (`temp_size_in_bytes`: what the program allocates besides its
arguments and outputs). Unchunked: the student returns logits `[B, L, V]`. Chunked: the
student returns features and `student_head` applies the head `chunk_size` positions at a
time (`mtkd_jax.objective.loss`).

Speed: the two steps run in the same process, alternately, at a size where both fit in this
machine's memory and run in seconds (the full size's unchunked step needs tens of GiB);
the JSON says which size was timed. `speed_ratio` = chunked / unchunked steps per second
(median over paired rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtkd_jax.objective.loss import DEFAULT_CHUNK_SIZE  # noqa: E402
from mtkd_jax.training.state import init_train_state  # noqa: E402
from mtkd_jax.training.steps import make_distill_step  # noqa: E402

FULL = dict(K=4, B=8, L=2048, V=32000, H=256)
TIMED = dict(K=4, B=2, L=1024, V=32000, H=256)
QUICK = dict(K=2, B=2, L=64, V=512, H=32)


def _features(p, x):
    return jnp.tanh(x @ p["body"])


def _head(p, f):
    return f @ p["head"]


def _logits(p, x):
    return _head(p, _features(p, x))


def _steps(chunk_size: int):
    tx = optax.sgd(0.1)
    plain = make_distill_step(_logits, None, tx, temperature=2.0, alpha=0.5)
    chunked = make_distill_step(_features, None, tx, temperature=2.0, alpha=0.5,
                                student_head=_head, chunk_size=chunk_size)
    return tx, {"unchunked": plain, "chunked": chunked}


def _shapes(s):
    f32 = jnp.float32
    params = {"body": jax.ShapeDtypeStruct((s["H"], s["H"]), f32),
              "head": jax.ShapeDtypeStruct((s["H"], s["V"]), f32)}
    batch = {
        "x": jax.ShapeDtypeStruct((s["B"], s["L"], s["H"]), f32),
        "y": jax.ShapeDtypeStruct((s["B"], s["L"]), jnp.int32),
        "mask": jax.ShapeDtypeStruct((s["B"], s["L"]), f32),
        "teacher_logits": jax.ShapeDtypeStruct((s["K"], s["B"], s["L"], s["V"]), f32),
    }
    return params, batch


def memory(size: dict, chunk_size: int) -> dict:
    tx, steps = _steps(chunk_size)
    params, batch = _shapes(size)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    out = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch, key).compile()
        m = compiled.memory_analysis()
        out[name] = {
            "temp_size_in_bytes": int(m.temp_size_in_bytes),
            "argument_size_in_bytes": int(m.argument_size_in_bytes),
            "output_size_in_bytes": int(m.output_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 2),
        }
    return out


def _concrete(size: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = size
    params = {"body": rng.normal(size=(s["H"], s["H"])).astype(np.float32) / np.sqrt(s["H"]),
              "head": rng.normal(size=(s["H"], s["V"])).astype(np.float32) / np.sqrt(s["H"])}
    lengths = rng.integers(s["L"] // 2, s["L"] + 1, size=s["B"])
    batch = {
        "x": rng.normal(size=(s["B"], s["L"], s["H"])).astype(np.float32),
        "y": rng.integers(0, s["V"], size=(s["B"], s["L"])).astype(np.int32),
        "mask": (np.arange(s["L"])[None] < lengths[:, None]).astype(np.float32),
        "teacher_logits": rng.normal(size=(s["K"], s["B"], s["L"], s["V"])).astype(np.float32),
    }
    return params, jax.device_put(batch)


def speed(size: dict, chunk_size: int, rounds: int) -> dict:
    tx, steps = _steps(chunk_size)
    params, batch = _concrete(size)
    key = jax.random.key(0)
    fns = {name: jax.jit(step) for name, step in steps.items()}
    states = {name: init_train_state(jax.device_put(params), tx) for name in fns}
    losses = {}
    for name, fn in fns.items():  # compile and warm up
        states[name], m = fn(states[name], batch, key)
        losses[name] = float(m["loss"])
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            states[name], m = fns[name](states[name], batch, key)
            jax.block_until_ready(m["loss"])
            times[name].append(time.perf_counter() - t0)
    paired = [c / u for c, u in zip(times["chunked"], times["unchunked"], strict=True)]
    return {
        "size": size,
        "rounds": rounds,
        "median_s": {name: float(np.median(t)) for name, t in times.items()},
        "first_loss": losses,
        # steps/s ratio = unchunked time / chunked time
        "speed_ratio": float(1.0 / np.median(paired)),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    mem_size = QUICK if args.quick else FULL
    time_size = QUICK if args.quick else TIMED
    chunk = min(args.chunk_size, mem_size["L"] // 4) if args.quick else args.chunk_size
    mem = memory(mem_size, chunk)
    spd = speed(time_size, min(chunk, time_size["L"]), 3 if args.quick else args.rounds)
    result = {
        "memory_ratio": mem["chunked"]["temp_size_in_bytes"]
        / mem["unchunked"]["temp_size_in_bytes"],
        "speed_ratio": spd["speed_ratio"],
        "memory": {"size": mem_size, "chunk_size": chunk, **mem},
        "speed": {**spd, "chunk_size": min(chunk, time_size["L"]),
                  "note": "timed at the smaller size `speed.size`: at the memory size the "
                          "unchunked step needs more memory than this machine has"
                  if time_size != mem_size else "timed at the memory size"},
        "versions": {"jax": jax.__version__, "python": platform.python_version(),
                     "backend": jax.default_backend()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
