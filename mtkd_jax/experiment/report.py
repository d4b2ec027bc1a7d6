"""Tables of a run: mean +- std over seeds, what helps and what doesn't, as text.

`aggregate` turns per-seed rows into mean and sample standard deviation (ddof = 1) over
seeds; `verdicts` compares every student row with the student trained alone and with the
student distilled from the best single teacher, by the paired per-seed difference (all rows
of a seed share its teachers and the student's initialisation); `results_markdown` is the
text of `results.md` (written with the other files by `mtkd_jax.experiment.run_folder`);
`summary` is the one-screen text printed at the end of a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtkd_jax.experiment.config import transfer_size

__all__ = [
    "TABLE_METRICS",
    "aggregate",
    "verdicts",
    "markdown_table",
    "results_markdown",
    "size_ratio",
    "speed_ratio",
    "summary",
]

TABLE_METRICS = ("accuracy", "recall", "f1", "nll", "ece", "agreement")
_PERCENT = {"accuracy", "recall", "f1", "precision", "agreement"}
_HEADERS = {"accuracy": "accuracy %", "recall": "macro recall %", "f1": "macro F1 %",
            "precision": "macro precision %", "nll": "NLL", "ece": "ECE",
            "agreement": "agreement w/ ensemble %"}


def _group(row: str) -> str:
    if row.startswith("teacher") or row == "ensemble":
        return "teachers"
    if row.startswith("codistill"):
        return "codistillation"
    return "students"


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def aggregate(seed_rows: Sequence[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every row and metric.

    Args:
      seed_rows: one `{row: {metric: value}}` per seed (`SeedResult.rows`).

    Returns:
      A list (rows in order of first appearance) of `{"row", "group", "n_seeds",
      "<metric>_mean", "<metric>_std", ...}`.

    Example:
      >>> from mtkd_jax.experiment.report import aggregate
      >>> rows = aggregate([{"alone": {"accuracy": 0.6}}, {"alone": {"accuracy": 0.7}}])
      >>> rows[0]["row"], round(rows[0]["accuracy_mean"], 3), round(rows[0]["accuracy_std"], 4)
      ('alone', 0.65, 0.0707)
    """
    order: list[str] = []
    for rows in seed_rows:
        order += [r for r in rows if r not in order]
    out = []
    for row in order:
        present = [rows[row] for rows in seed_rows if row in rows]
        rec: dict[str, Any] = {"row": row, "group": _group(row), "n_seeds": len(present)}
        for metric in present[0]:
            if metric == "n":
                continue
            values = [float(p[metric]) for p in present]
            rec[f"{metric}_mean"] = _mean(values)
            rec[f"{metric}_std"] = _std(values)
        out.append(rec)
    return out


_NO_TRANSFER = " (no transfer)"
_LABELS_ONLY = ("alone",)  # rows trained on the labeled split only, whatever the config
_CODISTILL_BASELINES = {"codistill (each)": "teachers (mean)", "codistill (ensemble)": "ensemble"}


def _compare(seed_rows, row: str, baseline: str, metric: str) -> dict[str, Any]:
    pairs = [(s[row][metric], s[baseline][metric]) for s in seed_rows
             if row in s and baseline in s]
    diffs = [a - b for a, b in pairs]
    spread = max(_std([a for a, _ in pairs]), _std([b for _, b in pairs]), _std(diffs))
    gain = _mean(diffs)
    if len(pairs) < 2:
        verdict = "undecided (1 seed)"
    elif gain > spread:
        verdict = "helps"
    elif gain < -spread:
        verdict = "hurts"
    else:
        verdict = "within noise"
    return {"row": row, "baseline": baseline, "gain_mean": gain, "gain_std": _std(diffs),
            "spread": spread, "verdict": verdict}


def verdicts(seed_rows: Sequence[dict[str, dict[str, float]]], *, metric: str = "accuracy",
             baselines: Sequence[str] = ("alone", "best_teacher")) -> list[dict[str, Any]]:
    """Rows against their baselines: paired per-seed differences of `metric`.

    Student rows are compared with each of `baselines` (the student alone, the student from
    the best single teacher). A row trained without the transfer set is compared with the
    baseline trained without it (``best_teacher (no transfer)``), when there is one. The
    codistilled teachers are compared with the teachers before codistillation
    (``codistill (each)`` with ``teachers (mean)``, ``codistill (ensemble)`` with
    ``ensemble``). A row "helps" when its mean gain exceeds the spread over seeds: the
    larger of the two rows' standard deviations and that of the paired differences
    ("hurts" for a loss beyond it, else "within noise"). With one seed there is no spread:
    "undecided".

    Returns:
      `[{"row", "baseline", "gain_mean", "gain_std", "spread", "verdict"}]`, as fractions.

    Example:
      >>> from mtkd_jax.experiment.report import verdicts
      >>> seeds = [{"alone": {"accuracy": a}, "mean": {"accuracy": m}}
      ...          for a, m in [(0.60, 0.80), (0.62, 0.81), (0.61, 0.83)]]
      >>> v = verdicts(seeds, baselines=("alone",))[0]
      >>> v["row"], round(v["gain_mean"], 3), v["verdict"]
      ('mean', 0.203, 'helps')
    """
    table = aggregate(seed_rows)
    present = {r["row"] for r in table}
    students = [r["row"] for r in table if r["group"] == "students"]
    out = []
    for i, base in enumerate(baselines):
        for row in students:
            if row in baselines[:i + 1]:
                continue
            # A row without the transfer set meets the baseline without it (the student
            # alone never uses it).
            b = base
            if row.endswith(_NO_TRANSFER) and base not in _LABELS_ONLY:
                b = f"{base}{_NO_TRANSFER}"
            if b in present and b != row:
                out.append(_compare(seed_rows, row, b, metric))
    out += [_compare(seed_rows, row, base, metric)
            for row, base in _CODISTILL_BASELINES.items()
            if row in present and base in present]
    return out


def _cell(rec: dict, metric: str) -> str:
    mean, std = rec.get(f"{metric}_mean"), rec.get(f"{metric}_std")
    if mean is None or math.isnan(mean):
        return "-"
    if metric in _PERCENT:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{_num(mean)} ± {_num(std)}"


def markdown_table(rows: Sequence[dict[str, Any]],
                   metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A markdown table of `aggregate` rows: `mean ± std` cells, percentages for rates.

    Example:
      >>> from mtkd_jax.experiment.report import aggregate, markdown_table
      >>> print(markdown_table(aggregate([{"alone": {"accuracy": 0.5}}]), ("accuracy",)))
      | row | accuracy % |
      |---|---|
      | alone | 50.0 ± 0.0 |
    """
    lines = ["| row | " + " | ".join(_HEADERS.get(m, m) for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for rec in rows:
        lines.append(f"| {rec['row']} | " + " | ".join(_cell(rec, m) for m in metrics) + " |")
    return "\n".join(lines)


def _compression_table(rows) -> str:
    if not rows:
        return "(compression not measured)"
    lat = sorted(k for k in rows[0] if k.startswith("latency_ms_b"))
    head = ["model", "params", "FLOPs / example"] + [
        f"latency batch {k.removeprefix('latency_ms_b')} (ms)" for k in lat]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", f"{r['flops_per_example']:,.0f}"]
        cells += [f"{r[k]:.3f}" for k in lat]
        if "x_smaller" in r and r["x_smaller"] != 1.0:
            cells[1] += f" ({size_ratio(r['x_smaller'], 'fewer', 'more')} than ensemble)"
            cells[2] += f" ({size_ratio(r['x_fewer_flops'], 'fewer', 'more')})"
            for i, k in enumerate(lat):
                b = k.removeprefix("latency_ms_b")
                cells[3 + i] += f" ({speed_ratio(r[f'x_faster_b{b}'])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _matrix_table(matrix) -> str:
    k = len(matrix)
    lines = ["| | " + " | ".join(f"t{j}" for j in range(k)) + " |", "|---" * (k + 1) + "|"]
    for i, row in enumerate(matrix):
        lines.append(f"| t{i} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    return "\n".join(lines)


def _verdict_lines(vs) -> list[str]:
    lines = []
    for v in vs:
        lines.append(
            f"- `{v['row']}` vs `{v['baseline']}`: {100 * v['gain_mean']:+.1f} ± "
            f"{100 * v['gain_std']:.1f} points (spread {100 * v['spread']:.1f}): "
            f"**{v['verdict']}**"
        )
    return lines


def _targets_mean(seeds) -> dict[str, dict[str, float]]:
    names: list[str] = []
    for s in seeds:
        names += [n for n in s.targets if n not in names]
    out = {}
    for n in names:
        present = [s.targets[n] for s in seeds if n in s.targets]
        out[n] = {m: _mean([p[m] for p in present]) for m in present[0]}
    return out


def results_markdown(result, strategies, *, table, plots: Sequence[str] = ()) -> str:
    """The text of the run folder's `results.md`.

    Args:
      result: an `ExperimentResult`.
      strategies: the parsed `Strategy` rows (for the legend).
      table: `aggregate` of the seeds' rows.
      plots: paths of the PNGs to show, in order.
    """
    env, config = result.environment, result.config
    first = result.seeds[0]
    n = len(result.seeds)
    out = [
        "# Multi-teacher distillation: results",
        "",
        f"- measured {env['date']} on {env['machine']} ({env['cpus']} CPUs), "
        f"{env['devices']} ({env['backend']}), {env['processes']} process(es), "
        f"JAX {env['jax']}; wall time {result.wall_seconds:.0f} s",
        f"- command: `{env['command']}`",
        f"- dataset `{config.dataset}`; {config.teachers.num} teachers "
        f"`{config.teachers.model}`; student `{config.student.model}`; "
        + (f"transfer set {transfer_size(config)} unlabeled inputs; "
           if transfer_size(config) else "no transfer set; ")
        + f"T = {config.distill.temperature}, alpha = {config.distill.alpha}, soft loss "
        f"`{config.distill.soft_loss}`",
        f"- teachers: batch {config.teachers.batch_size}, {config.teachers.epochs} epochs, "
        f"learning rate {config.teachers.learning_rate:g}; student: batch "
        f"{config.student.batch_size}, {config.student.steps} updates, learning rate "
        f"{config.student.learning_rate:g}",
        f"- test-set metrics, mean ± sample std over {n} seed(s) "
        f"({', '.join(str(s.seed) for s in result.seeds)}); "
        "agreement is with the original teacher ensemble",
    ]
    if getattr(result, "interrupted", False):
        out.append(f"- **stopped by Ctrl-C after {n} of {config.seeds} seed(s)**: the rows "
                   "below are those seeds'; the same command resumes the run")
    times = getattr(result, "times", None) or {}
    if times.get("wall"):
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in
                          sorted(times["wall"].items(), key=lambda kv: -kv[1]))
        out.append(f"- time per stage (wall): {parts}; compiling {times['compile']:.0f} s "
                   "of it")
    out += [
        "",
        "## Comparison",
        "",
        markdown_table(table),
        "",
        "## Does distillation pay? (paired per-seed differences in test accuracy)",
        "",
        *_verdict_lines(verdicts([s.rows for s in result.seeds])),
        "",
        "## Rows",
        "",
        "- `teacher_k`: teacher k alone; `ensemble`: mean of the teachers' probabilities",
        *[f"- `{s.name}`: {s.description}" for s in strategies],
        "- `<row> (no transfer)`: the same row trained on the labeled train split only",
        "- `codistill (each)`: mean over the K codistilled teachers; `codistill (ensemble)`: "
        "their ensemble",
        "",
        "## Compression",
        "",
        _compression_table(result.compression),
        "",
        "## Teachers on the validation set",
        "",
        "Validation accuracy per teacher, by seed: "
        + "; ".join(f"seed {s.seed}: "
                    + ", ".join(f"{100 * a:.1f}%" for a in s.teacher_val_accuracy)
                    for s in result.seeds),
        "",
    ]
    for kind, matrix in first.divergence.items():
        out += [f"Pairwise divergence `{kind}` (seed {first.seed}, mean over examples):", "",
                _matrix_table(matrix), ""]
    targets = _targets_mean(result.seeds)
    if targets:
        out += ["## Distillation targets on the validation set (mean over seeds, T = 1)", "",
                "| target | accuracy % | NLL | ECE | entropy | mean max weight (at T) |",
                "|---|---|---|---|---|---|"]
        for name, t in targets.items():
            out.append(f"| {name} | {100 * t['accuracy']:.1f} | {_num(t['nll'])} | "
                       f"{t['ece']:.3f} | {_num(t['entropy'])} | {_num(t['max_weight'])} |")
        out.append("")
        if "confidence" in targets:
            out += ["The `confidence` target weighs teachers by their loss on the true label, so "
                    "its accuracy here is optimistic; on unlabeled transfer inputs it uses the "
                    "ensemble's argmax instead.", ""]
    pngs = [os.path.basename(p) for p in plots]
    if pngs:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(out)


def size_ratio(x: float, fewer: str = "fewer", more: str = "more") -> str:
    """A count ratio (ensemble / this model) in words: "3.8x fewer", or "1.1x more" when
    this model is the larger.

    Example:
      >>> from mtkd_jax.experiment.report import size_ratio
      >>> size_ratio(3.8), size_ratio(0.9)
      ('3.8x fewer', '1.1x more')
    """
    if x is None or not math.isfinite(x) or x <= 0:
        return "—"
    return f"{x:.1f}x {fewer}" if x >= 1 else f"{1 / x:.1f}x {more}"


def speed_ratio(x: float) -> str:
    """A latency ratio (ensemble time / this model's time) in words.

    Example:
      >>> from mtkd_jax.experiment.report import speed_ratio
      >>> speed_ratio(8.8), speed_ratio(0.05), speed_ratio(float("nan"))
      ('8.8x faster', '20.0x slower', '—')
    """
    if x is None or not math.isfinite(x) or x <= 0:
        return "—"
    return f"{x:.1f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"


def _num(x: float) -> str:
    """Three decimals; scientific past 1e4 (a partial-class teacher's NLL is ~6e8: the
    log-probability of a class it does not know is that of `UNKNOWN_LOGIT`).

    Example:
      >>> from mtkd_jax.experiment.report import _num
      >>> _num(0.12345), _num(598999872.0), _num(float("nan"))
      ('0.123', '5.99e+08', '—')
    """
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3f}" if abs(x) < 1e4 else f"{x:.2e}"


def summary(result, strategies) -> str:
    """The one-screen text printed at the end of a run: the table, verdicts, wall time."""
    table = aggregate([s.rows for s in result.seeds])
    lines = [
        "",
        f"== {len(result.seeds)} seed(s), wall time {result.wall_seconds:.0f} s; "
        f"run folder {result.run_dir}",
        f"{'row':<28}{'accuracy %':>16}{'macro F1 %':>16}{'NLL':>16}{'ECE':>16}",
    ]
    for rec in table:
        lines.append(f"{rec['row']:<28}" + "".join(
            f"{_cell(rec, m):>16}" for m in ("accuracy", "f1", "nll", "ece")))
    vs = verdicts([s.rows for s in result.seeds])
    if vs:
        lines += ["", "vs baselines (paired test-accuracy gain, points):"]
        lines += [f"  {v['row']} vs {v['baseline']}: {100 * v['gain_mean']:+.1f} ± "
                  f"{100 * v['gain_std']:.1f} -> {v['verdict']}" for v in vs]
    if result.compression:
        s = result.compression[0]
        if "x_smaller" in s:
            lines += ["", f"{s['model']}: {size_ratio(s['x_smaller'])} params, "
                          f"{size_ratio(s['x_fewer_flops'])} FLOPs, "
                          f"{speed_ratio(s.get('x_faster_b1', float('nan')))} at batch 1 "
                          "than the ensemble"]
    lines.append(f"results: {os.path.join(result.run_dir, 'results.md')}")
    return "\n".join(lines)
