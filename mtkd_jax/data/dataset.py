"""The in-memory dataset every source returns: three numpy splits and their info.

A `Dataset` holds `train`, `validation` and `test` as `Split`s of float32 inputs `x [N, ...]`
and int32 labels `y [N]`, plus a `DatasetInfo` with the class names, the input shape and the
normalisation statistics of the train split. Sources only produce raw arrays per split;
`build_dataset` does the rest the same way for all of them (scaling, the holdout splits that a
source lacks, statistics, standardisation), so every dataset is preprocessed alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from mtkd_jax.data import preprocess

__all__ = ["Split", "DatasetInfo", "Dataset", "build_dataset", "SPLITS"]

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split: `x` `[N, ...]` float32 inputs, `y` `[N]` int32 labels; `len(split) == N`.

    The position of an example in the split is its index (the `"index"` of a batch), stable
    across runs for a given data dir and `load` arguments.
    """

    name: str
    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        x, y = np.asarray(self.x), np.asarray(self.y)
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"Split {self.name!r}: `x` must be [N, ...] and `y` [N] with the same N, got "
                f"x {x.shape} and y {y.shape}."
            )
        object.__setattr__(self, "x", x.astype(np.float32, copy=False))
        object.__setattr__(self, "y", y.astype(np.int32, copy=False))

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    Attributes:
      name: the name given to `load`.
      num_classes: C.
      class_names: C names, in label order.
      input_shape: shape of one example, e.g. `(40,)` or `(28, 28, 1)`.
      mean, std: statistics of the train split after scaling to [0, 1] (images) or as
        generated (signals): `[C]` per channel for images, `[]` for signals.
      normalized: whether the splits' `x` are `(x - mean) / std`.
      flip: whether a horizontal flip keeps the label (False for digits, characters and
        signals): pass it to `augment(..., flip=info.flip)`.
      source: where the data came from (builder, version, data dir or folder).
      notes: how the validation and test splits were made, when the source lacked them.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    normalized: bool
    flip: bool
    source: str
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Three splits and their `DatasetInfo`; `ds["train"]` is `ds.train`."""

    train: Split
    validation: Split
    test: Split
    info: DatasetInfo

    def __getitem__(self, split: str) -> Split:
        if split not in SPLITS:
            raise KeyError(f"Unknown split {split!r}; the splits are {SPLITS}.")
        return getattr(self, split)

    @property
    def splits(self) -> dict[str, Split]:
        return {s: getattr(self, s) for s in SPLITS}


def _take(xy: tuple[np.ndarray, np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return xy[0][idx], xy[1][idx]


def build_dataset(
    name: str,
    raw: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    class_names: tuple[str, ...],
    max_value: float | None,
    flip: bool,
    source: str,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    normalize: bool = True,
) -> Dataset:
    """Turn raw per-split arrays into a `Dataset`, preprocessed the same way for every source.

    Missing splits are held out of train with `split_seed`: first the test split (when the
    source has none), then the validation split, each `validation_fraction` of what remains.
    The statistics come from the final train split only.

    Args:
      name: dataset name, kept in the info.
      raw: `{"train": (x, y), ...}` with optional `"validation"` and `"test"`; `x` `[N, ...]`
        raw values, `y` `[N]` integer labels in `[0, C)`.
      class_names: the C class names.
      max_value: raw maximum to scale by (255, 16) or None to keep the values.
      flip: whether horizontal flips keep the label.
      source: a description of the source, kept in the info.
      validation_fraction: fraction held out when a split is missing, in [0, 1).
      split_seed: seed of the holdouts.
      normalize: standardise every split with the train statistics.

    Returns:
      The `Dataset`.

    Example:
      >>> import numpy as np
      >>> raw = {"train": (np.arange(20.0).reshape(10, 2), np.arange(10) % 2)}
      >>> ds = build_dataset("toy", raw, class_names=("a", "b"), max_value=None, flip=False,
      ...                    source="example", validation_fraction=0.2)
      >>> len(ds.train), len(ds.validation), len(ds.test), ds.info.input_shape
      (6, 2, 2, (2,))
    """
    if "train" not in raw:
        raise ValueError(f"Dataset {name!r} has no 'train' split; got splits {sorted(raw)}.")
    unknown = set(raw) - set(SPLITS)
    if unknown:
        raise ValueError(f"Dataset {name!r}: unknown splits {sorted(unknown)}; use {SPLITS}.")
    num_classes = len(class_names)
    splits = {k: (preprocess.scale_to_unit(x, max_value=max_value), np.asarray(y))
              for k, (x, y) in raw.items()}
    for k, (_, y) in splits.items():
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"Dataset {name!r}, split {k!r}: labels must lie in [0, {num_classes}), got "
                f"range [{y.min()}, {y.max()}]."
            )
    notes = []
    for i, missing in enumerate(("test", "validation")):
        if missing in splits:
            continue
        keep, held = preprocess.holdout_split(
            len(splits["train"][1]), fraction=validation_fraction, seed=split_seed + i
        )
        splits[missing] = _take(splits["train"], held)
        splits["train"] = _take(splits["train"], keep)
        notes.append(
            f"{missing}: {len(held)} examples held out of train "
            f"(fraction {validation_fraction}, seed {split_seed + i})"
        )
    x_train = splits["train"][0]
    if x_train.shape[0] == 0:
        raise ValueError(f"Dataset {name!r}: the train split is empty.")
    mean, std = preprocess.channel_stats(x_train)
    if normalize:
        splits = {k: (preprocess.standardize(x, mean, std), y) for k, (x, y) in splits.items()}
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        class_names=tuple(class_names),
        input_shape=tuple(x_train.shape[1:]),
        mean=mean,
        std=std,
        normalized=normalize,
        flip=flip,
        source=source,
        notes=tuple(notes),
    )
    return Dataset(**{k: Split(k, *splits[k]) for k in SPLITS}, info=info)
