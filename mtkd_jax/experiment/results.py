"""What a run measures: `SeedResult` per seed, `ExperimentResult` for the run, `METRICS`."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

__all__ = ["METRICS", "SeedResult", "ExperimentResult"]

METRICS = ("accuracy", "recall", "f1", "precision", "nll", "ece", "agreement")
"""Test metrics of every row (macro recall, F1 and precision; agreement with the ensemble)."""


@dataclasses.dataclass
class SeedResult:
    """Everything one seed of the pipeline measured.

    Attributes:
      seed: the seed.
      rows: row name -> test metrics (`METRICS` and `n`, Python floats). Rows are
        ``teacher_<k>``, ``teachers (mean)`` (their mean), ``ensemble``, each strategy's
        name, ``<name> (no transfer)`` for `config.distill.train_only`, and
        ``codistill (each)`` (mean over the K codistilled teachers) / ``codistill
        (ensemble)``.
      teacher_val_accuracy: `[K]` validation accuracies (the performance weights' scores).
      divergence: kind -> `[K, K]` mean pairwise divergence of the teachers' validation
        predictions (T = 1).
      targets: target (see `mtkd_jax.experiment.analysis.target_name`) -> quality of the
        fused target on the validation set: accuracy, NLL and ECE of the target as a
        prediction, mean entropy, mean largest teacher weight; and ``leave_one_out[k]``, the
        target of teacher k in codistillation.
      weights: target -> `[K, N_val]` per-example teacher weights at the distillation
        temperature.
      histories: model name -> `fit` history (`{"train": [...], "eval": [...]}`).
      steps: model name -> number of updates it was trained for.
      seconds: phase -> wall-clock seconds.
    """

    seed: int
    rows: dict[str, dict[str, float]]
    teacher_val_accuracy: list[float]
    divergence: dict[str, list[list[float]]]
    targets: dict[str, dict[str, float]]
    weights: dict[str, np.ndarray]
    histories: dict[str, dict]
    steps: dict[str, int]
    seconds: dict[str, float]


@dataclasses.dataclass
class ExperimentResult:
    """What `mtkd_jax.experiment.run` returns: the per-seed results, the compression rows,
    where and on what the run happened, and the files it wrote; `times` is
    `StageTimes.as_dict()` (wall/CPU seconds per stage, compile seconds), `interrupted`
    whether Ctrl-C stopped the run after `seeds`, and `plan` the config's `RunPlan` (what the
    run derived from it: rows, transfer set, teachers)."""

    config: ml_collections.ConfigDict
    run_dir: str
    seeds: list[SeedResult]
    compression: list[dict[str, Any]]
    environment: dict[str, Any]
    wall_seconds: float
    files: list[str]
    times: dict[str, Any] = dataclasses.field(default_factory=dict)
    interrupted: bool = False
    plan: Any = None
