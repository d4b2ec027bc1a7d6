"""digits as an offline TFDS builder: scikit-learn's bundled 8x8 handwritten digits.

`sklearn.datasets.load_digits()` holds 1797 images with integer intensities 0..16. A fixed
stratified shuffle splits them 80/20 into 1438 train / 359 test.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mtkd_jax.data.builders._common import stratified_split

SPLIT_SEED = 0
MAX_INTENSITY = 16


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """1797 digits `[8, 8, 1]` uint8 in 0..16: stratified 80/20 train/test, 10 classes."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits(), stratified 80/20, seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 8x8 digits (UCI optical recognition), values 0..16.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images.astype(np.uint8)[..., None]
        y = bunch.target
        train, test = stratified_split(y, test_fraction=0.2, seed=SPLIT_SEED)
        return {
            "train": self._generate_examples(images[train], y[train]),
            "test": self._generate_examples(images[test], y[test]),
        }

    def _generate_examples(self, images, labels):
        for i, (im, yi) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": im, "label": int(yi)}
