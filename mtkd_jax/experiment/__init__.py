"""Experiments: the article's pipeline end to end, the comparison table, its reports.

* `run(config)`: train K teachers, analyse their predictions, distil a student with every
  strategy, codistil, evaluate, over several seeds; write the run folder. `run_seed` is one
  seed of it; `prepare_run_dir` the run folder's `config.json` check.
* `default_config()`, `quick(config)` (its seconds-long variant), `validate_config(config)`
  (the one check; returns the `RunPlan`, what the run derives from the config),
  `ConfigError` (every config mistake), `STRATEGIES`, `strategy_names()`.
* `evaluate_logits`, `analyse_teachers`, `target_name`: the test metrics and the analysis of
  the teachers' predictions; `SeedResult`, `ExperimentResult`, `METRICS`: what a run measures.
* `report`, `plots`, `run_folder`, `compression`, `summaries`: tables, PNGs, the run folder's
  files, inference cost, TensorBoard.

The modules, one stage each: `context` (what every stage shares, the train loop),
`teachers` (stage 1), `analysis` (stages 2-4), `students` (stage 5), `results`, `runner`.
"""

from mtkd_jax.experiment import compression, plots, report, run_folder, summaries
from mtkd_jax.experiment.analysis import analyse_teachers, evaluate_logits, target_name
from mtkd_jax.experiment.config import (
    STRATEGIES,
    ConfigError,
    RunPlan,
    Strategy,
    default_config,
    parse_strategy,
    quick,
    strategy_names,
    validate_config,
)
from mtkd_jax.experiment.results import METRICS, ExperimentResult, SeedResult
from mtkd_jax.experiment.runner import prepare_run_dir, run, run_seed

__all__ = [
    "METRICS",
    "STRATEGIES",
    "ConfigError",
    "ExperimentResult",
    "RunPlan",
    "SeedResult",
    "Strategy",
    "analyse_teachers",
    "compression",
    "default_config",
    "evaluate_logits",
    "parse_strategy",
    "plots",
    "prepare_run_dir",
    "quick",
    "report",
    "run",
    "run_folder",
    "run_seed",
    "strategy_names",
    "summaries",
    "target_name",
    "validate_config",
]
