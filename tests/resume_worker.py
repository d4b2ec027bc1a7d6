"""Worker for tests/test_resume.py: a tiny softmax regression trained by
`mtkd_jax.training.fit.fit`.

    python tests/resume_worker.py --checkpoint-dir DIR --out OUT.json [--delay SECONDS]

It prints `start <step>` (the checkpoint it will resume from, -1 for none), then `step <n>`
after each update, flushed, so a test can SIGKILL it at a chosen step; `--delay` sleeps per
batch (like slow data loading) so the kill lands mid-run. When done it writes the final
params, history and best record to OUT.json (float32 values are exact in JSON).
"""

import argparse
import json
import time
from typing import Any, NamedTuple

N, D, C, BATCH, EPOCHS = 64, 5, 3, 8, 5
STEPS_PER_EPOCH = N // BATCH  # 8, so 40 steps in all
SAVE_EVERY, EVAL_EVERY = 3, 4


class State(NamedTuple):
    step: Any
    params: Any
    opt_state: Any


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    # Imported here so that pytest's doctest collection of this file stays cheap.
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mtkd_jax.training.checkpoint import Checkpointer
    from mtkd_jax.training.fit import fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(D, C)) + 0.3 * rng.normal(size=(N, C)), -1).astype(np.int32)
    tx = optax.adam(0.05)

    def loss_fn(params, xb, yb):
        logits = xb @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), logits

    @jax.jit
    def step_fn(state, batch, key):
        # An input scale drawn from the per-step key's bits, so the result depends on the key
        # schedule (as with dropout) without a threefry draw, which costs ~1 s to compile.
        xb = batch["x"] * (1.0 + (jax.random.key_data(key)[-1] % 1024) / 1e4)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, xb, batch["y"])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return State(state.step + 1, params, opt_state), {"loss": loss}

    @jax.jit
    def evaluate(params):
        loss, logits = loss_fn(params, x, y)
        return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y), "loss": loss}

    def batches_fn(epoch, start):
        order = np.random.default_rng([1, epoch]).permutation(N)
        for i in range(start, STEPS_PER_EPOCH):
            time.sleep(args.delay)
            idx = order[i * BATCH : (i + 1) * BATCH]
            yield {"x": x[idx], "y": y[idx]}

    def log_fn(step, metrics):
        if "train/loss" in metrics:
            print(f"step {step}", flush=True)

    with Checkpointer(args.checkpoint_dir) as ckpt:
        latest = ckpt.latest_step()
    print(f"start {-1 if latest is None else latest}", flush=True)

    params = {"w": jnp.zeros((D, C), jnp.float32), "b": jnp.zeros(C, jnp.float32)}
    out = fit(
        State(jnp.asarray(0, jnp.int32), params, tx.init(params)),
        step_fn,
        batches_fn,
        num_epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        key=jax.random.key(42),
        eval_fn=lambda state: evaluate(state.params),
        eval_every=EVAL_EVERY,
        checkpoint_dir=args.checkpoint_dir,
        save_every=SAVE_EVERY,
        patience=100,
        check_every=1,
        progress=False,
        log_fn=log_fn,
    )
    result = {
        "step": out.step,
        "resumed_from": out.resumed_from,
        "params": jax.tree.map(lambda a: np.asarray(a).tolist(), out.state.params),
        "opt_state": [np.asarray(a).tolist() for a in jax.tree.leaves(out.state.opt_state)],
        "history": out.history,
        "best": out.best,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
