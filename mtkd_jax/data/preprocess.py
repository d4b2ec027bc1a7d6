"""Per-dataset preprocessing on the host: scaling, channel axis, train statistics, holdouts.

All functions are NumPy, run once when a dataset is loaded, and return new arrays.
"""

from __future__ import annotations

import numpy as np

__all__ = ["scale_to_unit", "channel_stats", "standardize", "holdout_split"]


def scale_to_unit(x: np.ndarray, *, max_value: float | None) -> np.ndarray:
    """Cast to float32 and divide by `max_value` (255 for uint8 images) so values lie in [0, 1].

    Args:
      x: `[N, ...]` raw inputs.
      max_value: the largest raw value, or None to keep the values (MNIST-1D signals, which
        are real-valued and already standardised by their generator).

    Returns:
      `[N, ...]` float32.

    Example:
      >>> import numpy as np
      >>> scale_to_unit(np.array([[0, 255]], np.uint8), max_value=255)
      array([[0., 1.]], dtype=float32)
    """
    x = np.asarray(x, dtype=np.float32)
    if max_value is None:
        return x
    if not max_value > 0:
        raise ValueError(f"`max_value` must be > 0 or None, got {max_value}.")
    return x / np.float32(max_value)


def channel_stats(x: np.ndarray, *, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per channel for images, overall for signals.

    Computed in float64 and returned as float32. A constant channel gets std `eps` instead of
    0, so standardising never divides by zero.

    Args:
      x: `[N, H, W, C]` images (stats over N, H, W: shape `[C]`) or `[N, L]` signals (stats
        over everything: shape `[]`).

    Returns:
      `(mean, std)`, both `[C]` or `[]` float32.

    Example:
      >>> import numpy as np
      >>> mean, std = channel_stats(np.array([[[[0.0, 1.0]]], [[[2.0, 1.0]]]]))
      >>> mean.tolist(), std.tolist()
      ([1.0, 1.0], [1.0, 9.999999974752427e-07])
    """
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty batch [N, ...], got shape {x.shape}.")
    axes = tuple(range(x.ndim - 1)) if x.ndim == 4 else tuple(range(x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64)
    std = np.maximum(x.std(axis=axes, dtype=np.float64), eps)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """`(x - mean) / std` in float32, broadcasting `[C]` statistics over the last axis.

    Args:
      x: `[N, ...]` inputs scaled like the split the statistics came from.
      mean, std: `[C]` or `[]` from `channel_stats`.

    Returns:
      `[N, ...]` float32.

    Example:
      >>> import numpy as np
      >>> standardize(np.array([1.0, 3.0]), np.float32(1.0), np.float32(2.0))
      array([0., 1.], dtype=float32)
    """
    x = np.asarray(x, dtype=np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def holdout_split(n: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(keep, holdout)` of a random `fraction` of `n` examples, fixed by `seed`.

    Both are sorted, so the kept examples stay in their stored order and the holdout is
    reproducible across machines.

    Example:
      >>> keep, held = holdout_split(10, fraction=0.2, seed=0)
      >>> len(keep), len(held), sorted(set(keep) | set(held)) == list(range(10))
      (8, 2, True)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`fraction` must be in [0, 1), got {fraction}.")
    n_hold = int(round(fraction * n))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
