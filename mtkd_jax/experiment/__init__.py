"""Experiments: the article's pipeline end to end, the comparison table, its reports.

* `run(config)`: train K teachers, analyse their predictions, distil a student with every
  strategy, codistil, evaluate, over several seeds; write the run folder.
* `default_config()`, `validate_config(config)`, `STRATEGIES`, `strategy_names()`.
* `report`, `plots`, `compression`, `summaries`: tables, PNGs, inference cost, TensorBoard.
"""

from mtkd_jax.experiment import compression, plots, report, summaries
from mtkd_jax.experiment.config import (
    STRATEGIES,
    Strategy,
    default_config,
    parse_strategy,
    strategy_names,
    validate_config,
)
from mtkd_jax.experiment.pipeline import (
    ExperimentResult,
    SeedResult,
    evaluate_logits,
    run,
    run_seed,
)

__all__ = [
    "STRATEGIES",
    "ExperimentResult",
    "SeedResult",
    "Strategy",
    "compression",
    "default_config",
    "evaluate_logits",
    "parse_strategy",
    "plots",
    "report",
    "run",
    "run_seed",
    "strategy_names",
    "summaries",
    "validate_config",
]
