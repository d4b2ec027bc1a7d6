"""Evaluation metrics accumulated over batches.

* `classification`: accuracy, NLL, calibration (`MetricStats`, `batch_stats`,
  `compute_metrics`);
* `tokens`: token-level metrics over valid (unpadded) positions (`TokenStats`,
  `token_stats`, `compute_token_metrics`).
"""

from mtkd_jax.metrics.classification import (
    NUM_BINS,
    MetricStats,
    batch_stats,
    compute_metrics,
    init_stats,
    merge_stats,
    update_stats,
)
from mtkd_jax.metrics.tokens import TokenStats, compute_token_metrics, token_stats

__all__ = [
    "NUM_BINS",
    "MetricStats",
    "init_stats",
    "batch_stats",
    "update_stats",
    "merge_stats",
    "compute_metrics",
    "TokenStats",
    "token_stats",
    "compute_token_metrics",
]
