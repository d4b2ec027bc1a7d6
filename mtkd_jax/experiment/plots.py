"""PNG plots of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* `teacher_divergence.png`: heatmaps of the teachers' pairwise divergence, one per kind.
* `teacher_weights.png`: per strategy, the distribution over validation examples of the
  weight each teacher gets.
* `learning_curves.png`: validation accuracy against updates, of the teachers and of every
  student row (and the codistilled teachers), and the train losses, KL and MSE apart.
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
    fig = Figure(figsize=(3.8 * max(len(kinds), 1), 3.6))
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
        asym = not np.allclose(m, m.T)
        ax.set_title(f"divergence: {kind}" + ("\nrow i, column j: D(t_i || t_j)" if asym
                                              else " (symmetric)"), fontsize=9)
        ax.set_ylabel("teacher i" if asym else "")
        ax.set_xlabel("teacher j" if asym else "")
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
    bins = np.linspace(0.0, 1.0, 41)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        w = np.asarray(weights[name])
        for k in range(w.shape[0]):  # outlines, so no teacher hides another
            ax.hist(w[k], bins=bins, histtype="step", linewidth=1.4,
                    linestyle=("-", "--", ":", "-.")[k % 4],
                    label=f"teacher {k} (mean {w[k].mean():.2f})")
        ax.set_title(name)
        ax.set_xlabel("weight")
        ax.set_ylabel("validation examples")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle("per-example teacher weights of each target (validation set, first seed)")
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
    fig = Figure(figsize=(15, 4.2))
    ax_t, ax_s, ax_kl, ax_mse = (fig.add_subplot(1, 4, i) for i in (1, 2, 3, 4))
    for name in ("teachers", "codistill"):
        if name not in histories:
            continue
        steps, per = _eval_curve(histories[name], "accuracy_per_teacher")
        if per.size:
            for k in range(per.shape[1]):
                ax_t.plot(steps, 100 * per[:, k], ls="-" if name == "teachers" else "--",
                          marker="o", ms=3, label=f"{name} {k}")
    for name, hist in histories.items():
        if name.startswith("teacher_"):  # teachers of mixed architectures, trained one by one
            steps, acc = _eval_curve(hist)
            ax_t.plot(steps, 100 * acc, marker="o", ms=3, label=name)
    ax_t.set_title("teachers: validation accuracy")
    for name, hist in histories.items():
        if name in ("teachers", "codistill") or name.startswith("teacher_"):
            continue
        steps, acc = _eval_curve(hist)
        (line,) = ax_s.plot(steps, 100 * acc, marker="o", ms=3, label=name)
        train = hist.get("train", [])
        if train:
            ax_loss = ax_mse if name.endswith("_mse") else ax_kl
            ax_loss.plot([r["step"] for r in train], [np.mean(r["loss"]) for r in train],
                         marker="o", ms=3, color=line.get_color(), label=name)
    ax_s.set_title("students: validation accuracy")
    ax_kl.set_title("train loss: KL / CE rows")
    ax_mse.set_title("train loss: MSE rows")
    for ax in (ax_t, ax_s, ax_kl, ax_mse):
        ax.set_xlabel("updates")
    for ax in (ax_kl, ax_mse):
        ax.set_ylabel("epoch mean")
    for ax in (ax_kl, ax_mse):
        if ax.lines:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no row with this loss", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    ax_t.set_ylabel("%")
    ax_s.set_ylabel("%")
    if ax_t.lines:
        ax_t.legend(fontsize=7)
    if ax_s.lines:  # beside the panels, not over the curves
        fig.legend(*ax_s.get_legend_handles_labels(), loc="center right", fontsize=8,
                   title="student rows")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    return path


def plot_accuracy(table: list[dict], path: str) -> str:
    """Horizontal bars of test accuracy, mean +- std over seeds, one per row of `table`.

    Example:
      >>> import tempfile, os
      >>> from mtkd_jax.experiment.plots import plot_accuracy
      >>> t = [{"row": "alone", "group": "students", "accuracy_mean": 0.6, "accuracy_std": 0.01}]
      >>> os.path.getsize(plot_accuracy(t, tempfile.mktemp(suffix=".png"))) > 0
      True
    """
    fig = Figure(figsize=(8.5, 0.35 * len(table) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"teachers": "tab:gray", "students": "tab:blue", "codistillation": "tab:orange"}
    y = np.arange(len(table))[::-1]
    means = [100 * r["accuracy_mean"] for r in table]
    ax.barh(y, means, xerr=[100 * r["accuracy_std"] for r in table],
            color=[colors.get(r["group"], "tab:blue") for r in table], capsize=2)
    for yi, m in zip(y, means, strict=True):
        ax.text(m + 1, yi, f"{m:.1f}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([r["row"] for r in table], fontsize=8)
    ax.set_xlim(0, 105)  # from 0: bar lengths compare honestly
    ax.set_xlabel("test accuracy % (mean ± std over seeds; axis from 0)")
    groups = [g for g in colors if any(r["group"] == g for r in table)]
    from matplotlib.patches import Patch

    ax.legend([Patch(color=colors[g]) for g in groups], groups, fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    n = max((int(r.get("n_seeds", 1)) for r in table), default=1)
    ax.set_title(f"test accuracy of every row ({n} seed(s))")
    return _save(fig, path)
