"""`teacher_trust.png`: which teacher each strategy trusts, per true class.

For teachers from different sources (`config.sources`), one heatmap `[C, K]` per
distillation target: entry (c, k) is teacher k's mean weight over the validation examples of
true class c, averaged over seeds. The first panel is the reference: the share of class c's
training examples that teacher k saw (its source). A strategy that routes well looks like the
reference; ``mean`` is flat at 1/K.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from mtkd_jax.experiment.sources import source_splits

__all__ = ["trust_by_class", "source_shares", "plot_trust", "write_trust_plot"]


def trust_by_class(weights: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`[C, K]` mean weight of each teacher over the examples of each true class.

    Example:
      >>> import numpy as np
      >>> from mtkd_jax.experiment.trust_plot import trust_by_class
      >>> w = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])            # [K=2, N=3]
      >>> trust_by_class(w, np.array([0, 1, 1]), 2).tolist()
      [[1.0, 0.0], [0.25, 0.75]]
    """
    w = np.asarray(weights, np.float64)
    out = np.full((num_classes, w.shape[0]), np.nan)
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            out[c] = w[:, sel].mean(axis=1)
    return out


def source_shares(config, labels: np.ndarray, seed: int, num_classes: int) -> np.ndarray:
    """`[C, K]` share of class c's training examples in teacher k's source."""
    parts = source_splits(config, labels, seed, num_classes=num_classes)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts], axis=1)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def plot_trust(panels: dict[str, np.ndarray], path: str) -> str:
    """Heatmaps `[C, K]`, one per panel name, values in [0, 1].

    Example:
      >>> import tempfile, os, numpy as np
      >>> from mtkd_jax.experiment.trust_plot import plot_trust
      >>> p = plot_trust({"mean": np.full((3, 2), 0.5)}, tempfile.mktemp(suffix=".png"))
      >>> os.path.getsize(p) > 0
      True
    """
    names = list(panels)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.0 * cols, 3.4 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        m = np.asarray(panels[name], np.float64)
        ax.imshow(m, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
        c, k = m.shape
        ax.set_xticks(range(k))
        ax.set_xticklabels([f"t{j}" for j in range(k)])
        ax.set_yticks(range(c))
        ax.set_ylabel("true class")
        for a in range(c):
            for b in range(k):
                ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if m[a, b] > 0.5 else "w")
        ax.set_title(name, fontsize=9)
    fig.suptitle("mean weight of each teacher per true class (validation)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_trust_plot(result, dataset) -> str:
    """Draw ``teacher_trust.png`` of a run (every seed averaged) into its run folder."""
    config = result.config
    c = dataset.info.num_classes
    val_y = np.asarray(dataset.validation.y)
    panels = {"source (train share)": np.mean(
        [source_shares(config, np.asarray(dataset.train.y), s.seed, c) for s in result.seeds],
        axis=0)}
    for name in result.seeds[0].weights:
        panels[name] = np.nanmean(
            [trust_by_class(s.weights[name], val_y, c) for s in result.seeds], axis=0)
    return plot_trust(panels, os.path.join(result.run_dir, "teacher_trust.png"))
