"""`load`: one entry point from a dataset name to a `Dataset`, dispatching by a registry.

Names: the offline datasets (`mnist1d`, the default; `mnist5k`; `digits`), any TFDS
classification dataset prepared in the data dir (`mnist`, `fashion_mnist`, `cifar10`, ...),
and image folders as `"folder:/path/to/root"`.
"""

from __future__ import annotations

from mtkd_jax.data.builders import OFFLINE_BUILDERS
from mtkd_jax.data.dataset import Dataset
from mtkd_jax.data.image_folder import load_image_folder
from mtkd_jax.data.tfds_source import load_tfds, tfds_names

__all__ = ["load", "OFFLINE_DATASETS", "FOLDER_PREFIX"]

OFFLINE_DATASETS = tuple(OFFLINE_BUILDERS)
FOLDER_PREFIX = "folder:"


def load(
    name: str = "mnist1d",
    *,
    data_dir: str | None = None,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    normalize: bool = True,
    image_size: int | tuple[int, int] | None = None,
    download: bool = False,
    color_mode: str = "rgb",
    flip: bool = False,
) -> Dataset:
    """Load a dataset by name into memory: train / validation / test splits and its info.

    The offline datasets are generated into the TFDS data dir on first use (a few seconds)
    and read from there afterwards. TFDS datasets must already be prepared there (as
    array_record); a missing one fails at once with the command that prepares it. Sources
    without a validation split get one held out of train with `split_seed`. Inputs are scaled
    to [0, 1] (images) and, if `normalize`, standardised with the train split's statistics.

    Args:
      name: `"mnist1d"` (default), `"mnist5k"`, `"digits"`, a TFDS name, or
        `"folder:<root>"` for `root/<split>/<class>/*.png|jpg`.
      data_dir: TFDS data dir; default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`.
      validation_fraction: fraction of train held out for a missing split, in [0, 1).
      split_seed: seed of that holdout.
      normalize: standardise inputs with the train statistics (kept in `info.mean/std`).
      image_size: `(H, W)` or an int to resize images to; required for folders.
      download: let TFDS download a missing TFDS dataset (needs network).
      color_mode, flip: for image folders (see `load_image_folder`): ``"rgb"`` or
        ``"grayscale"``, and whether a horizontal flip keeps the label.

    Returns:
      A `Dataset`: `.train`, `.validation`, `.test` (`Split` with `x` float32 `[N, ...]`,
      `y` int32 `[N]`) and `.info` (`DatasetInfo`).

    Raises:
      ValueError: unknown name (the message lists the known ones) or bad arguments.
      FileNotFoundError: a TFDS dataset that is not prepared in the data dir.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ds = load("digits", data_dir=d)
      >>> ds.train.x.shape, ds.validation.x.shape, ds.test.x.shape
      ((1294, 8, 8, 1), (144, 8, 8, 1), (359, 8, 8, 1))
      >>> ds.info.class_names[:3], ds.info.flip
      (('0', '1', '2'), False)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty dataset name, got {name!r}.")
    common = dict(validation_fraction=validation_fraction, split_seed=split_seed,
                  normalize=normalize)
    if name.startswith(FOLDER_PREFIX):
        if image_size is None:
            raise ValueError(
                f"`image_size` (H, W) is required for image folders such as {name!r}."
            )
        return load_image_folder(name[len(FOLDER_PREFIX):], image_size=image_size,
                                 color_mode=color_mode, flip=flip, **common)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    base = name.split("/")[0].split(":")[0]
    if base not in OFFLINE_BUILDERS and base not in tfds_names(data_dir):
        raise ValueError(
            f"Unknown dataset {name!r}. Known: the offline datasets {list(OFFLINE_DATASETS)}; "
            f"image folders as '{FOLDER_PREFIX}<root>'; TFDS classification datasets such as "
            "'mnist', 'fashion_mnist', 'cifar10', 'cifar100' (see "
            "tensorflow_datasets.list_builders()) or any dataset prepared in the data dir."
        )
    return load_tfds(name, data_dir=data_dir, download=download, image_size=image_size, **common)
