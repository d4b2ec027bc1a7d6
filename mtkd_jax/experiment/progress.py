"""The whole run's progress and where its time goes: `RunProgress` and `StageTimes`.

`RunProgress` is one tqdm bar for the whole run (stage, training i of n, elapsed, ETA) above
the per-training bars of `mtkd_jax.training.fit.fit`; `StageTimes` adds up wall-clock and CPU
seconds per stage (teachers, analysis, students, codistillation, evaluation, ...) and the
seconds JAX spent tracing, lowering and compiling (from `jax.monitoring`'s duration events), so
a run says where its time went even on a shared machine (CPU seconds do not count other jobs).
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
import tqdm

__all__ = ["COMPILE_EVENTS", "RunProgress", "StageTimes", "log"]

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
"""`jax.monitoring` duration events counted as compilation."""


def log(message: str) -> None:
    """Print `message` on the first process only, above any progress bars."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class StageTimes:
    """Wall and CPU seconds per stage, and JAX compile seconds, while `listening`.

    Example:
      >>> from mtkd_jax.experiment.progress import StageTimes
      >>> times = StageTimes()
      >>> with times.listening():
      ...     with times.stage("work"):
      ...         _ = sum(range(1000))
      >>> sorted(times.wall), times.compile_seconds >= 0
      (['work'], True)
    """

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.compile_seconds = 0.0

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.compile_seconds += duration

    @contextlib.contextmanager
    def listening(self):
        """Count JAX's compile events while inside."""
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(self._on_event)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Add the wall and CPU seconds spent inside to stage `name`."""
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def as_dict(self) -> dict:
        """``{"wall": {stage: s}, "cpu": {stage: s}, "compile": s}``, rounded."""
        return {"wall": {k: round(v, 2) for k, v in self.wall.items()},
                "cpu": {k: round(v, 2) for k, v in self.cpu.items()},
                "compile": round(self.compile_seconds, 2)}

    def lines(self) -> list[str]:
        """One line per stage: wall and CPU seconds and share of the total wall time."""
        total = sum(self.wall.values()) or 1.0
        out = [f"  {name:<24}{w:8.1f} s wall {self.cpu[name]:8.1f} s CPU {100 * w / total:5.1f}%"
               for name, w in sorted(self.wall.items(), key=lambda kv: -kv[1])]
        out.append(f"  {'(of which compiling)':<24}{self.compile_seconds:8.1f} s")
        return out


class RunProgress:
    """One bar for the whole run: the stage, training i of n, elapsed and ETA.

    Args:
      total: trainings in the whole run (every seed's teachers, student groups,
        codistillation).
      enabled: draw the bar (`config.progress`, first process only); when off, `start`
        only logs the stage.
    """

    def __init__(self, total: int, *, enabled: bool):
        self.total = total
        self.done = 0
        self.bar = None
        if enabled and jax.process_index() == 0:
            self.bar = tqdm.tqdm(total=total, unit="training", position=0, leave=True,
                                 dynamic_ncols=True,
                                 bar_format="{desc} [{elapsed} elapsed, ETA {remaining}]")

    def start(self, description: str) -> None:
        """Name what runs now, e.g. ``seed 1/3: students``."""
        if self.bar is not None:
            self.bar.set_description_str(f"{description} (training {self.done + 1}"
                                         f" of {self.total})")

    def finished(self, n: int = 1) -> None:
        """`n` more trainings are done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
