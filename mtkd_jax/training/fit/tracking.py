"""What `loop.fit` tracks besides the state: history, best record, early-stopping counters.

A `Tracker` round-trips through checkpoint metadata as JSON (Python floats keep all their
bits), so a resumed run carries on bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Tracker", "all_finite", "host_value"]


def host_value(value: Any) -> float | list:
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()


@jax.jit
def all_finite(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


class Tracker:
    """Everything besides the state that a resumed run needs to carry on bit for bit.

    It round-trips through checkpoint metadata as JSON (Python floats keep all their bits).
    """

    def __init__(self, *, best_metric, best_mode, min_delta):
        self.best_metric, self.best_mode, self.min_delta = best_metric, best_mode, min_delta
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.best: dict | None = None
        self.bad_evals = 0
        self.sums: dict[str, Any] = {}
        self.count = 0

    def to_json(self) -> dict:
        sums = {k: host_value(v) for k, v in self.sums.items()}
        return {
            "history": self.history,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "sums": sums,
            "count": self.count,
        }

    def load(self, data: Mapping) -> None:
        self.history = {
            "train": list(data["history"]["train"]),
            "eval": list(data["history"]["eval"]),
        }
        self.best, self.bad_evals = data["best"], data["bad_evals"]
        self.sums = {k: np.asarray(v, np.float64) for k, v in data["sums"].items()}
        self.count = data["count"]

    def add_train(self, metrics: Mapping) -> None:
        for name, value in metrics.items():
            value = np.asarray(value, np.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def close_epoch(self, *, step: int, epoch: int) -> dict | None:
        if not self.count:
            return None
        record = {"step": step, "epoch": epoch, "steps": self.count}
        record.update({k: host_value(v / self.count) for k, v in self.sums.items()})
        self.history["train"].append(record)
        self.sums, self.count = {}, 0
        return record

    def add_eval(self, record: dict) -> bool:
        """Append an eval record; return whether it improved on the best."""
        if self.best_metric not in record:
            raise ValueError(
                f"`eval_fn` returned no {self.best_metric!r} (the `best_metric`); "
                f"it returned {sorted(k for k in record if k not in ('step', 'epoch'))}."
            )
        self.history["eval"].append(record)
        value = record[self.best_metric]
        if not isinstance(value, float):
            raise ValueError(
                f"`eval_fn`'s {self.best_metric!r} must be a scalar, got {np.shape(value)}."
            )
        if self.best is None:
            improved = np.isfinite(value)
        elif self.best_mode == "max":
            improved = value > self.best[self.best_metric] + self.min_delta
        else:
            improved = value < self.best[self.best_metric] - self.min_delta
        if improved:
            self.best, self.bad_evals = record, 0
        else:
            self.bad_evals += 1
        return bool(improved)
