"""Images from folders, the layout of Keras' `flow_from_directory` (the article's project).

    root/train/<class>/*.png|jpg      (required)
    root/val/<class>/...  (or valid/, validation/)          (optional)
    root/test/<class>/...                                   (optional)

Class names are the sorted sub-folder names of `train`; labels are their positions. Images are
decoded with Pillow, converted to RGB or grayscale (``color_mode="auto"``: grayscale when every
file is, read from the file headers), resized to `image_size` and scaled to [0, 1]; a missing
validation or test split is held out of train (see `build_dataset`). How many images were
resized or converted is in the dataset's `info.notes`.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mtkd_jax.data.dataset import Dataset, build_dataset

__all__ = ["load_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_SPLIT_DIRS = {"train": ("train",), "validation": ("val", "valid", "validation"),
               "test": ("test",)}
_COLOR_MODES = {"rgb": "RGB", "grayscale": "L"}
COLOR_MODES = ("auto", *_COLOR_MODES)
# Pillow modes that hold one gray channel (with or without alpha, any depth).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_split(split_dir: str, split: str) -> dict[str, list[str]]:
    """`{class name: sorted image paths}` of one split folder; errors for a malformed one."""
    entries = sorted(os.listdir(split_dir))
    loose = [e for e in entries if _is_image(e)]
    if loose:
        raise ValueError(
            f"Image folder split {split!r} at {split_dir!r} holds images directly ({loose[0]!r}, "
            f"...); put them in one sub-folder per class: {split_dir}/<class>/*.png."
        )
    classes = [e for e in entries if os.path.isdir(os.path.join(split_dir, e))]
    if not classes:
        raise ValueError(
            f"Image folder split {split!r} at {split_dir!r} has no class sub-folders; expected "
            f"{split_dir}/<class>/*.png|jpg."
        )
    files = {}
    for c in classes:
        paths = sorted(
            os.path.join(split_dir, c, f) for f in os.listdir(os.path.join(split_dir, c))
            if _is_image(f)
        )
        if not paths:
            raise ValueError(
                f"Image folder class folder {os.path.join(split_dir, c)!r} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)})."
            )
        files[c] = paths
    return files


def _header(path: str) -> tuple[str, tuple[int, int]]:
    """(Pillow mode, (W, H)) of an image file, from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"Image folder file {path!r} is not a readable image: {e}") from e


def _decode(path: str, size_wh: tuple[int, int], mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != size_wh:
                im = im.resize(size_wh, Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"Image folder file {path!r} is not a readable image: {e}") from e


def _is_gray(mode: str) -> bool:
    return mode in _GRAY_MODES


def _conversion_notes(headers, size_wh, color_mode: str, detected: bool) -> tuple[str, ...]:
    """What reading the files changed: counts of resized and converted images."""
    h, w = size_wh[1], size_wh[0]
    n = len(headers)
    resized = sum(size != size_wh for _, size in headers)
    gray = sum(_is_gray(m) for m, _ in headers)
    how = "detected: every file is grayscale" if detected and color_mode == "grayscale" else (
        "detected: some files are in color" if detected else "config.color_mode")
    notes = [f"{n} images read as {color_mode} ({how})"]
    notes.append(f"{resized} images resized to {h}x{w}" if resized
                 else f"all {n} images already {h}x{w}")
    if color_mode == "rgb" and gray:
        notes.append(f"{gray} grayscale images converted to RGB")
    elif color_mode == "grayscale" and n - gray:
        notes.append(f"{n - gray} color images converted to grayscale")
    return tuple(notes)


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int | tuple[int, int],
    color_mode: str = "rgb",
    flip: bool = False,
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    normalize: bool = True,
) -> Dataset:
    """Load `root/<split>/<class>/*.png|jpg` into a `Dataset`, keeping the class names.

    Args:
      root: the folder holding `train/` (and optionally `val/` or `validation/`, `test/`).
      image_size: `(H, W)` or one int for square images; every image is resized to it.
      color_mode: `"rgb"` (C = 3), `"grayscale"` (C = 1), or `"auto"`: grayscale when every
        file is grayscale, else RGB.
      flip: whether a horizontal flip keeps the label (recorded in `info.flip`); off by
        default (wrong for digits and text).
      validation_fraction, split_seed, normalize: see `build_dataset`.

    Returns:
      A `Dataset` with `x` `[N, H, W, C]` float32; `info.notes` says how many images were
      resized and converted.

    Raises:
      FileNotFoundError: `root` does not exist.
      ValueError: no `train/` folder, a split without class folders or a class without
        images, images outside class folders, a class in val/test that train lacks, or a
        file that is not a readable image.

    Example:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> tmp = tempfile.TemporaryDirectory()
      >>> root = tmp.name
      >>> for c in ("cat", "dog"):
      ...     os.makedirs(f"{root}/train/{c}")
      ...     for i in range(5):
      ...         Image.fromarray(np.full((6, 6, 3), i * 40, np.uint8)).save(
      ...             f"{root}/train/{c}/{i}.png")
      >>> ds = load_image_folder(root, image_size=4, validation_fraction=0.2)
      >>> ds.train.x.shape, ds.info.class_names
      ((6, 4, 4, 3), ('cat', 'dog'))
      >>> tmp.cleanup()
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder root {root!r} does not exist or is not a folder.")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(f"`image_size` must be (H, W) positive ints or one int, got {image_size}.")
    if color_mode not in COLOR_MODES:
        raise ValueError(f"`color_mode` must be one of {list(COLOR_MODES)}, got {color_mode!r}.")
    split_files = {}
    for split, names in _SPLIT_DIRS.items():
        found = [n for n in names if os.path.isdir(os.path.join(root, n))]
        if len(found) > 1:
            raise ValueError(f"Image folder {root!r} has both {found}; keep one of them.")
        if found:
            split_files[split] = _list_split(os.path.join(root, found[0]), split)
    if "train" not in split_files:
        raise ValueError(
            f"Image folder {root!r} has no 'train' folder; expected {root}/train/<class>/*.png "
            f"(found {sorted(os.listdir(root))})."
        )
    class_names = tuple(split_files["train"])
    label_of = {c: i for i, c in enumerate(class_names)}
    for split, files in split_files.items():
        unknown = sorted(set(files) - set(class_names))
        if unknown:
            raise ValueError(
                f"Image folder split {split!r} has classes {unknown} that train lacks; "
                f"train's classes are {list(class_names)}."
            )
    size_wh = (image_size[1], image_size[0])
    all_paths = [p for files in split_files.values() for c in files for p in files[c]]
    raw = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        headers = list(pool.map(_header, all_paths))
        detected = color_mode == "auto"
        if detected:
            color_mode = "grayscale" if all(_is_gray(m) for m, _ in headers) else "rgb"
        mode = _COLOR_MODES[color_mode]
        for split, files in split_files.items():
            paths = [p for c in files for p in files[c]]
            labels = np.array([label_of[c] for c in files for _ in files[c]], dtype=np.int64)
            images = list(pool.map(lambda p: _decode(p, size_wh, mode), paths))
            x = np.stack(images)
            raw[split] = (x[..., None] if x.ndim == 3 else x, labels)
    dataset = build_dataset(
        os.path.basename(os.path.normpath(root)),
        raw,
        class_names=class_names,
        max_value=255,
        flip=flip,
        source=f"folder:{root}",
        validation_fraction=validation_fraction,
        split_seed=split_seed,
        normalize=normalize,
    )
    notes = _conversion_notes(headers, size_wh, color_mode, detected)
    return dataclasses.replace(
        dataset, info=dataclasses.replace(dataset.info, notes=notes + dataset.info.notes))
