"""Distil Flax NNX teachers into an NNX student, with the library's steps, on MNIST-1D.

    python examples/nnx_distill.py            # the full run (about a minute on 2 CPU cores)
    python examples/nnx_distill.py --quick    # a few steps, for a smoke test

Two NNX CNN1D teachers, one with Dropout and one with BatchNorm, are trained with
`make_supervised_step`; an NNX MLP student with Dropout and BatchNorm is distilled from the
two (one frozen ensemble, in evaluation mode) on the train split plus unlabeled MNIST-1D
inputs that only the teachers label, and compared with the same student trained alone on the
train split. Everything is offline (`mtkd_jax.data.load("mnist1d")` generates the data).
The library handles what an NNX user would otherwise write by hand: train/eval mode on every
call, Dropout keys from the step key (`fold_in(key, step)`), BatchNorm statistics in
`TrainState.model_state`.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

import mtkd_jax as mk
from mtkd_jax import data
from mtkd_jax.models.zoo import nnx as nm

FULL = dict(teacher_epochs=12, student_epochs=12, transfer=5000, batch_size=128)
QUICK = dict(teacher_epochs=1, student_epochs=1, transfer=0, batch_size=128, max_steps=3)


def limited(batches, max_steps):
    for i, batch in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            return
        yield batch


def main(quick: bool = False) -> dict[str, float]:
    cfg = QUICK if quick else FULL
    start = time.perf_counter()
    ds = data.load("mnist1d")
    length, num_classes = ds.train.x.shape[1], ds.info.num_classes
    bs, max_steps = cfg["batch_size"], cfg.get("max_steps")

    def labeled(epoch):
        return limited(data.batches(ds.train, batch_size=bs, seed=0, epoch=epoch), max_steps)

    def test_batches():
        return data.batches(ds.test, batch_size=100, seed=0, epoch=0, shuffle=False)

    # 1. Two NNX teachers, each trained with the library's supervised step.
    teachers = {
        "teacher_dropout": nm.CNN1D(length, num_classes, dropout=0.3, rngs=nnx.Rngs(0)),
        "teacher_batchnorm": nm.CNN1D(length, num_classes, batch_norm=True, rngs=nnx.Rngs(1)),
    }
    t_models, t_variables, accuracy = [], [], {}
    tx_t = optax.adam(3e-3)
    for seed, (name, module) in enumerate(teachers.items()):
        model, params, model_state = mk.nnx_split(module)
        state = mk.init_train_state(params, tx_t, model_state=model_state)
        step = jax.jit(mk.make_supervised_step(model, tx_t))
        for epoch in range(cfg["teacher_epochs"]):
            for batch in labeled(epoch):
                state, _ = step(state, batch, jax.random.key(10 + seed))
        t_models.append(model)
        t_variables.append(mk.variables_of(state))
        res = mk.evaluate(mk.make_eval_step(model), mk.variables_of(state), test_batches())
        accuracy[name] = res["student"]["accuracy"]

    # 2. The two as one frozen ensemble (different architectures: a tuple), eval mode.
    teacher_apply = mk.make_heterogeneous_apply(t_models, names=tuple(teachers))
    teacher_params = tuple(t_variables)

    # 3. The NNX student with Dropout and BatchNorm: alone, and distilled.
    def student():
        return nm.MLP(length, num_classes, features=(256, 256), dropout=0.1, batch_norm=True,
                      rngs=nnx.Rngs(2))

    tx = optax.adam(2e-3)
    model, params, model_state = mk.nnx_split(student())
    alone = mk.init_train_state(params, tx, model_state=model_state)
    step = jax.jit(mk.make_supervised_step(model, tx))
    for epoch in range(cfg["student_epochs"]):
        for batch in labeled(epoch):
            alone, _ = step(alone, batch, jax.random.key(3))

    # Distillation data: the train split (labeled) plus unlabeled inputs (label_mask 0).
    x = ds.train.x
    if cfg["transfer"]:
        x = np.concatenate([x, data.mnist1d_transfer_set(cfg["transfer"], seed=1, info=ds.info)])
    y = np.zeros(len(x), np.int32)
    y[: len(ds.train)] = ds.train.y
    mask = (np.arange(len(x)) < len(ds.train)).astype(np.float32)

    def mixed(epoch):
        order = np.random.default_rng(epoch).permutation(len(x))
        for i in range(len(x) // bs):
            if max_steps is not None and i >= max_steps:
                return
            idx = order[i * bs:(i + 1) * bs]
            yield {"x": x[idx], "y": y[idx], "label_mask": mask[idx]}

    model, params, model_state = mk.nnx_split(student())
    distilled = mk.init_train_state(params, tx, model_state=model_state)
    step = jax.jit(mk.make_distill_step(model, teacher_apply, tx, temperature=4.0, alpha=0.3))
    for epoch in range(cfg["student_epochs"]):
        for batch in mixed(epoch):
            distilled, _ = step(distilled, batch, jax.random.key(4), teacher_params=teacher_params)

    ev = mk.make_eval_step(model, teacher_apply)
    for name, state in (("student_alone", alone), ("student_distilled", distilled)):
        res = mk.evaluate(ev, mk.variables_of(state), test_batches(),
                          teacher_params=teacher_params, teacher_names=tuple(teachers))
        accuracy[name] = res["student"]["accuracy"]
    accuracy["ensemble"] = res["ensemble"]["accuracy"]
    accuracy["seconds"] = time.perf_counter() - start
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    result = main(quick=parser.parse_args().quick)
    for name, value in result.items():
        print(f"{name:>18}: {value:.1f} s" if name == "seconds" else
              f"{name:>18}: test accuracy {100 * value:.1f}%")
    gain = result["student_distilled"] - result["student_alone"]
    print(f"distilled student vs the same student alone: {100 * gain:+.1f} points")
