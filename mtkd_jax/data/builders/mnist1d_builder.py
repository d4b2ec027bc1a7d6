"""MNIST-1D as an offline TFDS builder: generated procedurally, no download.

MNIST-1D (Greydanus & Kobak, 2020) renders the ten digit templates as length-40 signals with
random padding, scaling, translation, correlated and iid noise, and shear. The `mnist1d`
package's `make_dataset(get_dataset_args())` gives the standard 4000 train / 1000 test split
(seed 42) in about 3 s. Its `get_dataset()` is never called: it tries to download from github.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mtkd_jax.data.builders._common import isolated_global_rng

# The standard dataset's seed in `mnist1d.data.get_dataset_args()`; the transfer set refuses it.
STANDARD_SEED = 42
SIGNAL_LENGTH = 40


def generate_mnist1d(*, num_samples: int = 5000, seed: int = STANDARD_SEED) -> dict:
    """Run `mnist1d.data.make_dataset` with numpy's global RNG saved and restored.

    Returns its dict: `x` `[0.8 n, 40]`, `y`, `x_test` `[0.2 n, 40]`, `y_test` (float64/int64),
    standardised by the package over all `n` samples.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    with isolated_global_rng():
        return make_dataset(args)


class Mnist1d(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST-1D: 4000 train / 1000 test signals `[40]` float32, 10 classes."""

    # Registration is skipped so that importing this module twice (reloads, doctest imports)
    # cannot collide in TFDS's global registry; prepared data is still readable by name through
    # `tfds.builder("mnist1d", data_dir=...)`, which finds the files in the data dir.
    name = "mnist1d"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mnist1d.make_dataset(get_dataset_args()), seed 42."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST-1D: procedurally generated 1-D digit signals of length 40.",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(SIGNAL_LENGTH,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("x", "label"),
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        data = generate_mnist1d()
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, x, y):
        for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
            yield i, {"x": xi.astype(np.float32), "label": int(yi)}
