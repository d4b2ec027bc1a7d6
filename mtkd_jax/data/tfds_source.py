"""TFDS datasets by name, read from the data dir as array_record with no TensorFlow.

`tfds.load` needs TensorFlow, so splits are read through `builder.as_data_source` (the
ArrayRecord random-access reader behind `tfds.data_source`) straight into numpy arrays.
A dataset that is not prepared in the data dir fails at once with the command that prepares
it: without network a TFDS download attempt only gives up after minutes of retries, so this
module never downloads unless asked to (`download=True`).

The offline builders in `mtkd_jax.data.builders` are prepared here on first use (that needs
neither network nor TensorFlow) and then read the same way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from mtkd_jax.data.builders import OFFLINE_BUILDERS, OFFLINE_RAW_MAX, TEXT_BUILDERS
from mtkd_jax.data.dataset import Dataset, build_dataset

__all__ = ["default_data_dir", "prepare_offline", "load_tfds", "tfds_names", "NO_FLIP"]

# Datasets whose classes change under a horizontal flip (digits, characters) or that are not
# images; everything else is assumed to be natural images where flipping keeps the label.
NO_FLIP = frozenset(
    {"mnist1d", "mnist5k", "digits", "mnist", "emnist", "kmnist", "binarized_mnist",
     "svhn_cropped", "omniglot", "mnist_corrupted", "binary_alpha_digits"}
)
# TFDS split names -> ours; other splits ("extra", "unlabelled", ...) are not read.
_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation",
                "valid": "validation", "test": "test"}
_log = logging.getLogger(__name__)


def default_data_dir() -> str:
    """The TFDS data dir: `$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets`.

    Example:
      >>> import os
      >>> default_data_dir() == os.environ.get(
      ...     "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
      True
    """
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def tfds_names(data_dir: str | None = None) -> list[str]:
    """Names `load` accepts through TFDS: TFDS's own catalogue plus datasets in the data dir.

    TFDS's community catalogue is left out: listing it reaches for Google Cloud Storage.

    Example:
      >>> "cifar10" in tfds_names()
      True
    """
    data_dir = data_dir or default_data_dir()
    names = set(tfds.list_builders(with_community_datasets=False))
    if os.path.isdir(data_dir):
        names.update(d for d in os.listdir(data_dir)
                     if os.path.isdir(os.path.join(data_dir, d))
                     and d not in ("downloads", "mtkd_lm"))  # mtkd_lm: lm_data's caches
    return sorted(names)


def _prepare_command(name: str, data_dir: str) -> str:
    return (
        "pip install tensorflow tensorflow-datasets && python -c \"import tensorflow_datasets "
        f"as tfds; tfds.builder('{name}', data_dir='{data_dir}', file_format='array_record')"
        ".download_and_prepare()\""
    )


def _not_prepared(name: str, data_dir: str, path) -> FileNotFoundError:
    return FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in the data dir {data_dir!r} (no "
        f"dataset_info.json under {os.fspath(path)}). Downloads are off by default: with no "
        "network a TFDS download only fails after minutes of retries. On a machine with "
        f"internet run\n  {_prepare_command(name, data_dir)}\nthen copy "
        f"{os.path.join(data_dir, name.split('/')[0].split(':')[0])} into this machine's data "
        f"dir, or call load({name!r}, download=True) where there is network."
    )


@contextlib.contextmanager
def _prepare_lock(data_dir: str, name: str):
    """An exclusive lock per dataset and data dir, so that processes preparing the same dataset
    at once (parallel test runs, several workers on one machine) wait for each other instead
    of failing on TFDS's final rename. POSIX only; elsewhere there is no lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.prepare.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_offline(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepare an offline builder (`mnist1d`, `mnist5k`, `digits`, or a text domain of
    `mtkd_jax.data.corpora.TEXT_DOMAINS`) once, then reuse it.

    Generation runs locally (a few seconds) and writes array_record files to
    `data_dir/<name>/<version>`; later calls find them and only read metadata. Concurrent
    callers on one machine wait for the first one rather than generating twice.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     b = prepare_offline("digits", d)
      ...     b.is_prepared(), b.info.splits["train"].num_examples
      (True, 1438)
    """
    builders = {**OFFLINE_BUILDERS, **TEXT_BUILDERS}
    if name not in builders:
        raise ValueError(f"`name` must be one of {sorted(builders)}, got {name!r}.")
    data_dir = data_dir or default_data_dir()
    builder = builders[name](data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with _prepare_lock(data_dir, name):
        # Built again: another process may have prepared it while we waited, and a builder
        # reads the prepared metadata (its splits) only when constructed.
        builder = builders[name](data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            _log.info("Preparing offline dataset %r into %s", name, builder.data_path)
            # TFDS prints its progress to stdout; keep it in the log instead.
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        # Statistics for TFDS's catalogue; `build_dataset` computes its own.
                        compute_stats=tfds.download.ComputeStatsMode.SKIP
                    )
                )
            _log.info("%s", printed.getvalue().strip())
    return builder


def _resize_fn(image_size: tuple[int, int] | None) -> Callable[[np.ndarray], np.ndarray]:
    if image_size is None:
        return np.asarray
    from PIL import Image

    def resize(im: np.ndarray) -> np.ndarray:
        squeeze = im.ndim == 3 and im.shape[-1] == 1
        pil = Image.fromarray(im[..., 0] if squeeze else im)
        out = np.asarray(pil.resize(image_size[::-1], Image.Resampling.BILINEAR))
        return out[..., None] if squeeze else out

    return resize


def _read_split(source, x_key: str, y_key: str, resize) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a data source, in stored order, as `(x [N, ...], y [N])`.

    A plain loop over the ArrayRecord source: decoding is CPU-bound and holds the GIL, so a
    threaded loader only adds per-element work (measurements in benchmarks/RESULTS.md), and
    batched `__getitems__` is not supported by `tfds.testing.mock_data`.
    """
    xs, ys = [], []
    for i in range(len(source)):
        example = source[i]
        xs.append(resize(example[x_key]))
        ys.append(example[y_key])
    if not xs:
        raise ValueError(f"Split of {source!r} is empty.")
    shapes = {np.shape(x) for x in xs}
    if len(shapes) > 1:
        raise ValueError(
            f"Examples of {source!r} have different shapes {sorted(shapes)[:4]}...; pass "
            "`image_size=(H, W)` to resize them."
        )
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def load_tfds(
    name: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    image_size: tuple[int, int] | None = None,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    normalize: bool = True,
) -> Dataset:
    """Load a supervised TFDS classification dataset into memory from the data dir.

    Reads the splits `train`, `validation` (or `val`) and `test` through
    `builder.as_data_source`; a missing validation (or test) split is held out of train with
    `split_seed`. uint8 inputs are scaled to [0, 1]; statistics come from the train split.

    Args:
      name: a TFDS name (`"mnist"`, `"cifar10"`, `"cifar10:3.0.2"`), an offline builder
        (`"mnist1d"`, `"mnist5k"`, `"digits"`), or a dataset prepared in the data dir.
      data_dir: the TFDS data dir; default `default_data_dir()`.
      download: let TFDS download and prepare a missing dataset (needs network and, for
        image datasets, TensorFlow to encode images).
      image_size: `(H, W)` to resize images to; required for datasets of varying size.
      validation_fraction, split_seed, normalize: see `build_dataset`.

    Returns:
      A `Dataset`.

    Raises:
      FileNotFoundError: the dataset is not in the data dir and `download` is False.
      ValueError: the dataset has no (input, label) supervised keys or a non-class label.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ds = load_tfds("digits", data_dir=d)
      >>> ds.train.x.shape, ds.info.num_classes, ds.info.flip
      ((1294, 8, 8, 1), 10, False)
    """
    data_dir = data_dir or default_data_dir()
    base = name.split("/")[0].split(":")[0]
    if base in OFFLINE_BUILDERS:
        builder = prepare_offline(base, data_dir)
        max_value = OFFLINE_RAW_MAX[base]
    else:
        # No file_format here: TFDS refuses it when it differs from a prepared dataset's, and
        # the reader below explains what to do about a TFRecord-only dataset.
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            if not download:
                raise _not_prepared(name, data_dir, builder.data_path)
            builder.download_and_prepare(file_format="array_record")
        max_value = None
    info = builder.info
    if not info.supervised_keys or len(info.supervised_keys) != 2:
        raise ValueError(
            f"TFDS dataset {name!r} has no (input, label) supervised_keys "
            f"({info.supervised_keys!r}); only classification datasets can be loaded."
        )
    x_key, y_key = info.supervised_keys
    label = info.features[y_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(
            f"TFDS dataset {name!r}: label feature {y_key!r} is {type(label).__name__}, not "
            "a ClassLabel; only classification datasets can be loaded."
        )
    x_feature = info.features[x_key]
    if max_value is None and np.dtype(x_feature.np_dtype) == np.uint8:
        max_value = 255
    resize = _resize_fn(tuple(image_size) if image_size is not None else None)
    raw = {}
    for tfds_split in info.splits:
        ours = _SPLIT_NAMES.get(tfds_split)
        if ours is None or ours in raw:
            continue
        try:
            source = builder.as_data_source(split=tfds_split)
        except NotImplementedError as e:
            stored = getattr(info.file_format, "value", info.file_format)
            raise ValueError(
                f"TFDS dataset {name!r} in {data_dir!r} is stored as {stored}, which "
                f"has no random access without TensorFlow. Prepare it as array_record:\n  "
                f"{_prepare_command(name, data_dir)}"
            ) from e
        raw[ours] = _read_split(source, x_key, y_key, resize)
    if "train" not in raw:
        raise ValueError(
            f"TFDS dataset {name!r} has no 'train' split (it has {list(info.splits)}); "
            "load needs one to compute the normalisation statistics."
        )
    is_images = len(raw["train"][0].shape) == 4
    return build_dataset(
        base,
        raw,
        class_names=tuple(label.names),
        max_value=max_value,
        flip=is_images and base not in NO_FLIP,
        source=f"tfds:{builder.name}:{builder.version} at {data_dir}",
        validation_fraction=validation_fraction,
        split_seed=split_seed,
        normalize=normalize,
    )
