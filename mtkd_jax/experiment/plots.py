"""PNG plots of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* `teacher_divergence.png`: heatmaps of the teachers' pairwise divergence, one per kind.
* `teacher_weights.png`: per strategy, the distribution over validation examples of the
  weight each teacher gets.
* `learning_curves.png`: validation accuracy against updates, of the teachers and of every
  student row (and the codistilled teachers).
* `accuracy.png`: test accuracy of every row, mean and std over seeds.

`mtkd_jax.experiment.run_folder` draws them all from the first seed, except `accuracy.png`.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "plot_divergence",
    "plot_weights",
    "plot_learning_curves",
    "plot_accuracy",
]


def _save(fig: Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_divergence(divergence: dict[str, list[list[float]]], path: str) -> str:
    """Heatmaps `[K, K]` of the teachers' mean pairwise divergence, one panel per kind.

    Example:
      >>> import tempfile, os
      >>> from mtkd_jax.experiment.plots import plot_divergence
      >>> p = plot_divergence({"squared": [[0, 1], [1, 0]]}, tempfile.mktemp(suffix=".png"))
      >>> os.path.getsize(p) > 0
      True
    """
    kinds = list(divergence)
    fig = Figure(figsize=(3.6 * max(len(kinds), 1), 3.2))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        m = np.asarray(divergence[kind], dtype=np.float64)
        im = ax.imshow(m, cmap="viridis")
        k = m.shape[0]
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels([f"t{j}" for j in range(k)])
        ax.set_yticklabels([f"t{j}" for j in range(k)])
        mid = 0.5 * (m.min() + m.max())
        for a in range(k):
            for b in range(k):
                ax.text(b, a, f"{m[a, b]:.3g}", ha="center", va="center", fontsize=8,
                        color="k" if m[a, b] > mid else "w")
        ax.set_title(f"divergence: {kind}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_weights(weights: dict[str, np.ndarray], path: str) -> str:
    """Histograms of the per-example teacher weights `[K, N]` of each strategy.

    Example:
      >>> import tempfile, os, numpy as np
      >>> from mtkd_jax.experiment.plots import plot_weights
      >>> p = plot_weights({"mean": np.full((2, 5), 0.5)}, tempfile.mktemp(suffix=".png"))
      >>> os.path.getsize(p) > 0
      True
    """
    names = list(weights)
    cols = min(len(names), 3) or 1
    rows = -(-len(names) // cols) or 1
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        w = np.asarray(weights[name])
        bins = np.linspace(0.0, 1.0, 41)
        for k in range(w.shape[0]):
            ax.hist(w[k], bins=bins, alpha=0.5, label=f"teacher {k} (mean {w[k].mean():.2f})")
        ax.set_title(name)
        ax.set_xlabel("weight")
        ax.set_ylabel("validation examples")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _eval_curve(history: dict, key: str = "accuracy"):
    steps = [r["step"] for r in history.get("eval", []) if key in r]
    values = [r[key] for r in history.get("eval", []) if key in r]
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def plot_learning_curves(histories: dict[str, dict], path: str) -> str:
    """Validation accuracy against updates: teachers (one line each) and every student row.

    Example:
      >>> import tempfile, os
      >>> from mtkd_jax.experiment.plots import plot_learning_curves
      >>> h = {"mean": {"train": [{"step": 5, "loss": 1.0}],
      ...               "eval": [{"step": 5, "accuracy": 0.5}, {"step": 10, "accuracy": 0.7}]}}
      >>> os.path.getsize(plot_learning_curves(h, tempfile.mktemp(suffix=".png"))) > 0
      True
    """
    fig = Figure(figsize=(12, 4))
    ax_t, ax_s, ax_l = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for name in ("teachers", "codistill"):
        if name not in histories:
            continue
        steps, per = _eval_curve(histories[name], "accuracy_per_teacher")
        if per.size:
            for k in range(per.shape[1]):
                ax_t.plot(steps, 100 * per[:, k], ls="-" if name == "teachers" else "--",
                          label=f"{name} {k}")
    for name, hist in histories.items():
        if name.startswith("teacher_"):  # teachers of mixed architectures, trained one by one
            steps, acc = _eval_curve(hist)
            ax_t.plot(steps, 100 * acc, label=name)
    ax_t.set_title("teachers: validation accuracy")
    for name, hist in histories.items():
        if name in ("teachers", "codistill") or name.startswith("teacher_"):
            continue
        steps, acc = _eval_curve(hist)
        ax_s.plot(steps, 100 * acc, marker=".", label=name)
        train = hist.get("train", [])
        if train:
            ax_l.plot([r["step"] for r in train], [np.mean(r["loss"]) for r in train],
                      label=name)
    ax_s.set_title("students: validation accuracy")
    ax_l.set_title("students: train loss (epoch means)")
    ax_l.set_yscale("log")
    for ax in (ax_t, ax_s, ax_l):
        ax.set_xlabel("updates")
        if ax.lines:
            ax.legend(fontsize=7)
    ax_t.set_ylabel("%")
    ax_s.set_ylabel("%")
    return _save(fig, path)


def plot_accuracy(table: list[dict], path: str) -> str:
    """Horizontal bars of test accuracy, mean +- std over seeds, one per row of `table`.

    Example:
      >>> import tempfile, os
      >>> from mtkd_jax.experiment.plots import plot_accuracy
      >>> t = [{"row": "alone", "group": "students", "accuracy_mean": 0.6, "accuracy_std": 0.01}]
      >>> os.path.getsize(plot_accuracy(t, tempfile.mktemp(suffix=".png"))) > 0
      True
    """
    fig = Figure(figsize=(7, 0.35 * len(table) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"teachers": "tab:gray", "students": "tab:blue", "codistillation": "tab:orange"}
    y = np.arange(len(table))[::-1]
    means = [100 * r["accuracy_mean"] for r in table]
    ax.barh(y, means, xerr=[100 * r["accuracy_std"] for r in table],
            color=[colors.get(r["group"], "tab:blue") for r in table])
    ax.set_yticks(y)
    ax.set_yticklabels([r["row"] for r in table], fontsize=8)
    lo = max(0.0, min(means) - 10)
    ax.set_xlim(lo, 100)
    ax.set_xlabel("test accuracy % (mean ± std over seeds)")
    return _save(fig, path)

