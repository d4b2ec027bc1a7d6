"""Data for mtkd_jax: datasets in memory, deterministic host-sharded batches, augmentation.

* `load(name)`: `"mnist1d"` (default), `"mnist5k"`, `"digits"` (offline TFDS builders,
  prepared on first use), any TFDS dataset prepared in the data dir, or `"folder:<root>"`;
  returns a `Dataset` of three `Split`s (`x` float32 `[N, ...]`, `y` int32 `[N]`) and a
  `DatasetInfo` (classes, input shape, train statistics, whether flips keep labels).
* `batches(split, batch_size=, seed=, epoch=)`: this host's slice of each global batch,
  `{"x", "y", "index"}`; `num_batches` gives steps per epoch.
* `augment(key, x)`: jit-safe random crop and flip, one view shared by all models.
* `mnist1d_transfer_set(n, seed=)`: extra unlabeled MNIST-1D inputs for distillation.
* Language-model data: `prepare_lm_data(domains, seq_len=, seed=)` -> `LMData` (packed rows
  per domain and split, the tokenizer), built from real text domains (`TEXT_DOMAINS`,
  `load_domain`, or the user's `load_text_files` / `load_jsonl`), a byte-level BPE
  tokenizer (`train_tokenizer`, `load_tokenizer`, `check_vocab`) and packing
  (`pack_documents`, `PackedSplit`; batches from `mtkd_jax.data.packing.batches`).
"""

from mtkd_jax.data.augment import augment
from mtkd_jax.data.corpora import (
    TEXT_DOMAINS,
    TextDomain,
    load_domain,
    load_jsonl,
    load_text_files,
)
from mtkd_jax.data.dataset import SPLITS, Dataset, DatasetInfo, Split, build_dataset
from mtkd_jax.data.image_folder import load_image_folder
from mtkd_jax.data.lm_data import LMData, prepare_lm_data
from mtkd_jax.data.packing import PackedSplit, pack_documents
from mtkd_jax.data.pipeline import batches, epoch_order, num_batches
from mtkd_jax.data.sources import FOLDER_PREFIX, OFFLINE_DATASETS, load
from mtkd_jax.data.tfds_source import NO_FLIP, default_data_dir, load_tfds, prepare_offline
from mtkd_jax.data.tokenizer import TextTokenizer, check_vocab, load_tokenizer, train_tokenizer
from mtkd_jax.data.transfer import mnist1d_transfer_set

__all__ = [
    "FOLDER_PREFIX",
    "NO_FLIP",
    "OFFLINE_DATASETS",
    "SPLITS",
    "TEXT_DOMAINS",
    "Dataset",
    "DatasetInfo",
    "LMData",
    "PackedSplit",
    "Split",
    "TextDomain",
    "TextTokenizer",
    "augment",
    "batches",
    "build_dataset",
    "check_vocab",
    "default_data_dir",
    "epoch_order",
    "load",
    "load_domain",
    "load_image_folder",
    "load_jsonl",
    "load_text_files",
    "load_tfds",
    "load_tokenizer",
    "mnist1d_transfer_set",
    "num_batches",
    "pack_documents",
    "prepare_lm_data",
    "prepare_offline",
    "train_tokenizer",
]
