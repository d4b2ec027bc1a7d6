"""Data for mtkd_jax: datasets in memory, deterministic host-sharded batches, augmentation.

* `load(name)`: `"mnist1d"` (default), `"mnist5k"`, `"digits"` (offline TFDS builders,
  prepared on first use), any TFDS dataset prepared in the data dir, or `"folder:<root>"`;
  returns a `Dataset` of three `Split`s (`x` float32 `[N, ...]`, `y` int32 `[N]`) and a
  `DatasetInfo` (classes, input shape, train statistics, whether flips keep labels).
* `batches(split, batch_size=, seed=, epoch=)`: this host's slice of each global batch,
  `{"x", "y", "index"}`; `num_batches` gives steps per epoch.
* `augment(key, x)`: jit-safe random crop and flip, one view shared by all models.
* `mnist1d_transfer_set(n, seed=)`: extra unlabeled MNIST-1D inputs for distillation.
"""

from mtkd_jax.data.augment import augment
from mtkd_jax.data.dataset import SPLITS, Dataset, DatasetInfo, Split, build_dataset
from mtkd_jax.data.image_folder import load_image_folder
from mtkd_jax.data.pipeline import batches, epoch_order, num_batches
from mtkd_jax.data.sources import FOLDER_PREFIX, OFFLINE_DATASETS, load
from mtkd_jax.data.tfds_source import NO_FLIP, default_data_dir, load_tfds, prepare_offline
from mtkd_jax.data.transfer import mnist1d_transfer_set

__all__ = [
    "FOLDER_PREFIX",
    "NO_FLIP",
    "OFFLINE_DATASETS",
    "SPLITS",
    "Dataset",
    "DatasetInfo",
    "Split",
    "augment",
    "batches",
    "build_dataset",
    "default_data_dir",
    "epoch_order",
    "load",
    "load_image_folder",
    "load_tfds",
    "mnist1d_transfer_set",
    "num_batches",
    "prepare_offline",
]
