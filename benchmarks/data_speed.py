"""Input pipeline speed: is the data ever the bottleneck of a train step here?

Run:  python benchmarks/data_speed.py [--data-dir DIR] [--batch-size 128] [--repeats 5]

For MNIST-1D and mnist5k it measures, from the TFDS data dir (prepared first if needed):
  * load: reading the prepared array_record splits into memory (`mtkd_jax.data.load`);
  * batches: one shuffled epoch of `mtkd_jax.data.batches` (examples/s, best of --repeats);
  * augment (mnist5k): the jitted random crop and flip on one batch;
  * step: a jitted SGD step of a small MLP (2 hidden layers of 256) on one batch, as a
    lower bound on what a real train step costs; "pipeline share" = batch time / step time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import data


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _mlp_step(input_dim: int, num_classes: int):
    """A jitted SGD step of a 2x256 MLP: roughly the cheapest model worth training."""
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [input_dim, 256, 256, num_classes]
    params = [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(p, x, y):
        h = x.reshape(x.shape[0], -1)
        for w, b in p[:-1]:
            h = jax.nn.relu(h @ w + b)
        logits = h @ p[-1][0] + p[-1][1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    @jax.jit
    def step(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g)

    return params, step


def bench(name: str, data_dir: str | None, batch_size: int, repeats: int) -> None:
    data.load(name, data_dir=data_dir)  # prepares on first use; not timed
    load_s = _best(lambda: data.load(name, data_dir=data_dir), repeats)
    ds = data.load(name, data_dir=data_dir)
    split = ds.train
    n_total = sum(len(s) for s in ds.splits.values())
    steps = data.num_batches(split, batch_size=batch_size)

    def epoch():
        for _ in data.batches(split, batch_size=batch_size, seed=0, epoch=1):
            pass

    epoch_s = _best(epoch, repeats)
    batch_s = epoch_s / steps
    print(f"{name}: train {split.x.shape}, batch {batch_size}, {steps} batches/epoch")
    print(f"  load (array_record -> memory, all splits): {n_total / load_s:,.0f} examples/s "
          f"({load_s * 1e3:.0f} ms for {n_total})")
    print(f"  batches (shuffled epoch): {steps * batch_size / epoch_s:,.0f} examples/s "
          f"({batch_s * 1e6:.0f} us per batch)")

    b = next(data.batches(split, batch_size=batch_size, seed=0, epoch=0))
    x, y = jnp.asarray(b["x"]), jnp.asarray(b["y"])
    if x.ndim == 4:
        aug = jax.jit(data.augment, static_argnames=("pad", "flip"))
        aug(jax.random.key(0), x, flip=False).block_until_ready()
        aug_s = _best(lambda: aug(jax.random.key(1), x, flip=False).block_until_ready(), 20)
        print(f"  augment (jit, crop pad 4): {batch_size / aug_s:,.0f} examples/s "
              f"({aug_s * 1e6:.0f} us per batch)")
    params, step = _mlp_step(int(np.prod(ds.info.input_shape)), ds.info.num_classes)
    jax.block_until_ready(step(params, x, y))
    step_s = _best(lambda: jax.block_until_ready(step(params, x, y)), 20)
    print(f"  MLP 2x256 SGD step: {step_s * 1e6:.0f} us per batch; pipeline share "
          f"{batch_s / (batch_s + step_s):.1%} of batch + step time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"data dir {args.data_dir or data.default_data_dir()}")
    for name in ("mnist1d", "mnist5k"):
        bench(name, args.data_dir, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
