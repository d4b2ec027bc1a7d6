"""The files of a run folder: tables (CSV), analysis and histories (JSON), plots, results.md.

`write_run_folder` writes them all from an `ExperimentResult`: the text comes from
`mtkd_jax.experiment.report`, the PNGs from `mtkd_jax.experiment.plots` (neither imports the
other).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtkd_jax.experiment import plots, report

__all__ = ["write_plots", "write_run_folder"]


def _write_csv(path: str, records: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def write_plots(result, run_dir: str, table: list[dict]) -> list[str]:
    """Draw every plot of a run into `run_dir`; return the paths.

    Args:
      result: an `ExperimentResult`; the divergences, weights and learning curves are its
        first seed's.
      run_dir: where the PNGs go.
      table: `report.aggregate` of the seeds' rows (for `accuracy.png`).
    """
    first = result.seeds[0]
    paths = []
    if first.divergence:
        paths.append(plots.plot_divergence(first.divergence,
                                           os.path.join(run_dir, "teacher_divergence.png")))
    if first.weights:
        paths.append(plots.plot_weights(first.weights,
                                        os.path.join(run_dir, "teacher_weights.png")))
    paths.append(plots.plot_learning_curves(first.histories,
                                            os.path.join(run_dir, "learning_curves.png")))
    paths.append(plots.plot_accuracy(table, os.path.join(run_dir, "accuracy.png")))
    return paths


def _analysis(result, seed_rows) -> dict[str, Any]:
    seeds = result.seeds
    return {
        "teacher_val_accuracy": {s.seed: s.teacher_val_accuracy for s in seeds},
        "divergence": {s.seed: s.divergence for s in seeds},
        "targets": {s.seed: s.targets for s in seeds},
        "mean_teacher_weights": {
            s.seed: {n: np.mean(w, axis=1).tolist() for n, w in s.weights.items()}
            for s in seeds
        },
        "steps": {s.seed: s.steps for s in seeds},
        "seconds": {s.seed: s.seconds for s in seeds},
        "verdicts": report.verdicts(seed_rows),
        "environment": result.environment,
        "wall_seconds": result.wall_seconds,
    }


def write_run_folder(result, strategies) -> list[str]:
    """Write the run folder's tables, analysis, histories, plots and `results.md`.

    Args:
      result: an `ExperimentResult` (its `run_dir`, `seeds`, `compression`, `environment`,
        `config`); plots only with `config.plots`.
      strategies: the parsed `Strategy` rows (for the legend of `results.md`).

    Returns:
      The paths written: ``results.csv``, ``results_per_seed.csv``, ``compression.csv`` (when
      measured), ``analysis.json``, ``histories.json``, the PNGs, ``results.md``.
    """
    run_dir = result.run_dir
    seed_rows = [s.rows for s in result.seeds]
    table = report.aggregate(seed_rows)
    files = []

    path = os.path.join(run_dir, "results.csv")
    _write_csv(path, table)
    files.append(path)
    path = os.path.join(run_dir, "results_per_seed.csv")
    _write_csv(path, [{"seed": s.seed, "row": row, **metrics}
                      for s in result.seeds for row, metrics in s.rows.items()])
    files.append(path)
    if result.compression:
        path = os.path.join(run_dir, "compression.csv")
        _write_csv(path, result.compression)
        files.append(path)

    path = os.path.join(run_dir, "analysis.json")
    with open(path, "w") as f:
        json.dump(_analysis(result, seed_rows), f, indent=1, default=float, allow_nan=True)
    files.append(path)
    path = os.path.join(run_dir, "histories.json")
    with open(path, "w") as f:
        json.dump({s.seed: s.histories for s in result.seeds}, f, default=float)
    files.append(path)

    pngs = write_plots(result, run_dir, table) if result.config.plots else []
    files += pngs

    path = os.path.join(run_dir, "results.md")
    with open(path, "w") as f:
        f.write(report.results_markdown(result, strategies, table=table, plots=pngs))
    files.append(path)
    return files
