"""Distil from teachers you already have: checkpoints written by your own JAX/orbax code.

    python examples/own_checkpoints.py [--workdir DIR]   # the full run
    python examples/own_checkpoints.py --quick           # a few steps, for a smoke test

Part 1 is a user's own code, with no mtkd_jax call: MNIST-1D from the `mnist1d` package
(generated offline), a Linen CNN with BatchNorm written here, trained twice (two seeds) with
a hand-written optax loop and saved with `ocp.StandardCheckpointer` as `{"params",
"batch_stats"}`; an NNX MLP with Dropout trained with `nnx.Optimizer` and saved with an
`ocp.CheckpointManager` as `nnx.state(model)`.

Part 2 reads them with `mtkd_jax.teachers.load_orbax_teachers` (the two Linen checkpoints
stacked into one ensemble member run with `make_stacked_apply`, the NNX one from the
manager's newest step) and distils an NNX student from the three.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

FULL = dict(epochs=10, student_epochs=15, batch_size=128)
QUICK = dict(epochs=1, student_epochs=1, batch_size=128, max_steps=3)


# ---- Part 1: the user's own models, training and checkpoints (no mtkd_jax) -----------------

class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = x[..., None]
        for width in (32, 64):
            x = nn.Conv(width, (5,))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
            x = nn.max_pool(x, (2,), (2,))
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1))))


class NNXMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(40, 256, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.hidden(x))))


def user_data():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 5000
    # make_dataset seeds numpy's legacy global RNG: restore it afterwards.
    state = np.random.get_state()  # noqa: NPY002
    d = make_dataset(args)
    np.random.set_state(state)  # noqa: NPY002
    return (d["x"].astype(np.float32), d["y"].astype(np.int32),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int32))


def user_batches(x, y, epoch, batch_size, max_steps=None):
    order = np.random.default_rng(epoch).permutation(len(x))
    for i in range(len(x) // batch_size):
        if max_steps is not None and i >= max_steps:
            return
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x[idx], y[idx]


def train_linen_teacher(seed, x, y, cfg):
    model, tx = LinenCNN(), optax.adam(3e-3)
    variables = model.init(jax.random.key(seed), x[:1], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new
        grads, new = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state

    for epoch in range(cfg["epochs"]):
        for xb, yb in user_batches(x, y, epoch, cfg["batch_size"], cfg.get("max_steps")):
            params, stats, opt_state = step(params, stats, opt_state, xb, yb)
    return {"params": params, "batch_stats": stats}


def train_nnx_teacher(x, y, cfg):
    model = NNXMLP(rngs=nnx.Rngs(7))
    optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss)(model))

    model.train()
    for epoch in range(cfg["epochs"]):
        for xb, yb in user_batches(x, y, epoch, cfg["batch_size"], cfg.get("max_steps")):
            step(model, optimizer, xb, yb)
    return model


def part1_user_code(workdir, cfg):
    x, y, _, _ = user_data()
    linen_dirs = []
    with ocp.StandardCheckpointer() as ckptr:
        for seed in (0, 1):
            path = os.path.join(workdir, f"linen_teacher_{seed}")
            ckptr.save(path, train_linen_teacher(seed, x, y, cfg))
            linen_dirs.append(path)
    manager_dir = os.path.join(workdir, "nnx_teacher")
    with ocp.CheckpointManager(manager_dir) as manager:
        manager.save(cfg["epochs"], args=ocp.args.StandardSave(nnx.state(train_nnx_teacher(x, y,
                                                                                            cfg))))
    return linen_dirs, manager_dir


# ---- Part 2: distil from them with mtkd_jax --------------------------------------------------

def part2_distil(linen_dirs, manager_dir, cfg):
    import mtkd_jax as mk
    from mtkd_jax.models.zoo import nnx as nm

    x, y, x_test, y_test = user_data()
    # What to read: abstract models (shapes only), as the user defined them.
    linen = mk.linen_model(LinenCNN())
    linen_target = jax.eval_shape(lambda: LinenCNN().init(jax.random.key(0), x[:1], train=False))
    nnx_target = nnx.eval_shape(lambda: NNXMLP(rngs=nnx.Rngs(0)))
    linen_variables = mk.models.linen_variables(mk.load_orbax_teachers(linen_dirs, linen_target))
    nnx_teacher = mk.as_model(nnx_target)
    nnx_variables = mk.load_orbax_teachers(manager_dir, nnx_target)  # newest step

    # One frozen ensemble of 3: the two stacked Linen CNNs, then the NNX MLP (eval mode).
    run_linen = mk.make_stacked_apply(linen, strategy="loop")

    def teacher_apply(tp, xb):
        return jnp.concatenate([run_linen(tp[0], xb), nnx_teacher.eval_apply(tp[1], xb)[None]])

    teacher_params = (linen_variables, nnx_variables)
    student = nm.MLP(40, 10, features=(128,), dropout=0.1, batch_norm=True, rngs=nnx.Rngs(3))
    model, params, model_state = mk.nnx_split(student)
    tx = optax.adam(2e-3)
    state = mk.init_train_state(params, tx, model_state=model_state)
    step = jax.jit(mk.make_distill_step(model, teacher_apply, tx, weighting="confidence",
                                        temperature=4.0, alpha=0.5))
    for epoch in range(cfg["student_epochs"]):
        for xb, yb in user_batches(x, y, epoch, cfg["batch_size"], cfg.get("max_steps")):
            state, _ = step(state, {"x": xb, "y": yb}, jax.random.key(0),
                            teacher_params=teacher_params)
    test = [{"x": x_test[i:i + 100], "y": y_test[i:i + 100]} for i in range(0, len(x_test), 100)]
    res = mk.evaluate(mk.make_eval_step(model, teacher_apply), mk.variables_of(state), test,
                      teacher_params=teacher_params,
                      teacher_names=("linen_seed0", "linen_seed1", "nnx_mlp"))
    return {name: r["accuracy"] for name, r in res.items()}


def main(workdir: str | None = None, quick: bool = False) -> dict[str, float]:
    cfg = QUICK if quick else FULL
    start = time.perf_counter()
    workdir = workdir or tempfile.mkdtemp(prefix="own_checkpoints_")
    linen_dirs, manager_dir = part1_user_code(workdir, cfg)
    out = part2_distil(linen_dirs, manager_dir, cfg)
    out["seconds"] = time.perf_counter() - start
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the user's checkpoints go")
    parser.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    args = parser.parse_args()
    for name, value in main(args.workdir, args.quick).items():
        print(f"{name:>12}: {value:.1f} s" if name == "seconds" else
              f"{name:>12}: test accuracy {100 * value:.1f}%")
