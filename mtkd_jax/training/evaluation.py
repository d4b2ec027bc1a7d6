"""Evaluation: the student, each teacher and the teacher ensemble, side by side.

`make_eval_step` gives additive statistics per batch (`mtkd_jax.metrics.MetricStats`:
confusion matrix, NLL sum, calibration bins, agreement counts), which add exactly across
batches and devices; `evaluate` sums them over a split and turns them into metrics once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.metrics import MetricStats, batch_stats, compute_metrics, merge_stats
from mtkd_jax.metrics.tokens import TokenStats, compute_token_metrics, token_stats
from mtkd_jax.models.adapt import eval_apply_of
from mtkd_jax.objective.targets import fuse_targets
from mtkd_jax.training.batch import batch_parts, check_batch, teacher_logits_of

__all__ = ["make_eval_step", "evaluate"]


def make_eval_step(
    student_apply: Callable | None,
    teacher_apply: Callable | None = None,
    *,
    ensemble_weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> Callable:
    """Build an eval step giving additive metric statistics for the student and the teachers.

    The teacher ensemble is the (weighted) mean of the teachers' probabilities at T = 1, the
    same fusion as the distillation target; agreement is measured against it for the student
    and every teacher. Examples with `batch["label_mask"]` 0 (e.g. padding) are not counted.
    A sequence batch (`batch["y"]` `[B, L]`, `batch["mask"]` `[B, L]`, logits `[B, L, V]`)
    gives `mtkd_jax.metrics.tokens.TokenStats` over its valid tokens instead (per-token
    accuracy, NLL / perplexity, agreement with the ensemble).

    Args:
      student_apply: `apply(params, x) -> [B, C]`; or a `mtkd_jax.models.Model` (or a Linen
        or NNX module), run in evaluation mode (`Model.eval_apply`: Dropout off, running
        statistics) on its variables, so `params` is then `mtkd_jax.variables_of(state)`;
        or None to evaluate teachers only.
      teacher_apply: `apply(teacher_params, x) -> [K, B, C]`, or None (then teacher logits
        are read from `batch["teacher_logits"]` when present).
      ensemble_weights: optional `[K]` weights of the ensemble (non-negative, summing to 1),
        uniform when None.
      axis_name: psum the statistics over this mapped axis (per-device use).

    Returns:
      Un-jitted `eval_step(params, batch, *, teacher_params=None) -> dict[str, MetricStats]`
      with keys ``"student"``, ``"teachers"`` (leaves with a leading K axis) and
      ``"ensemble"`` (the last two when teacher logits are available). Sum over batches with
      `mtkd_jax.metrics.merge_stats` (or use `evaluate`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.training.evaluation import make_eval_step
      >>> from mtkd_jax.metrics import compute_metrics
      >>> teachers = lambda tp, x: jnp.stack([x @ tp, -x @ tp])
      >>> step = jax.jit(make_eval_step(lambda p, x: x @ p, teachers))
      >>> s = step(jnp.eye(2), {"x": jnp.eye(2), "y": jnp.array([0, 1])},
      ...          teacher_params=jnp.eye(2))
      >>> float(compute_metrics(s["student"])["accuracy"])
      1.0
    """
    if ensemble_weights is not None:
        _checks.check_weight_values(ensemble_weights, "ensemble_weights")
    if student_apply is not None:
        student_apply = eval_apply_of(student_apply)

    def eval_step(params, batch: dict, *, teacher_params=None) -> dict[str, MetricStats]:
        parts = batch_parts(batch)
        x, labels, mask, b, token_mask = parts
        if labels is None:
            raise ValueError("Evaluation needs labels in batch['y'].")
        lead = parts.lead
        sequence = len(lead) > 1
        if sequence:
            mask = parts.hard_mask
        stats_fn = token_stats if sequence else batch_stats
        teacher_logits = teacher_logits_of(batch, x, teacher_apply, teacher_params,
                                           required=False, lead=lead)
        logits = None if student_apply is None else student_apply(params, x)
        if logits is not None and (
            jnp.ndim(logits) != len(lead) + 1 or tuple(jnp.shape(logits)[:-1]) != lead
        ):
            layout = "[B, L, V]" if sequence else "[B, C]"
            raise ValueError(
                f"`student_apply` must return logits {layout} with leading axes {lead}, got "
                f"{jnp.shape(logits)}."
            )
        if logits is not None and teacher_logits is not None:
            if logits.shape[-1] != teacher_logits.shape[-1]:
                raise ValueError(
                    f"the student predicts {logits.shape[-1]} classes but the teachers "
                    f"{teacher_logits.shape[-1]}; they must share the class count."
                )
        out = {}
        ens = None
        if teacher_logits is not None:
            k = teacher_logits.shape[0]
            probs = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
            w = jnp.full((k,), 1.0 / k) if ensemble_weights is None else ensemble_weights
            ens = fuse_targets(probs, jnp.asarray(w, jnp.float32))
            out["teachers"] = jax.vmap(
                lambda z: stats_fn(z, labels, reference_probs=ens, mask=mask)
            )(teacher_logits)
            ens_logits = jnp.log(jnp.maximum(ens, jnp.finfo(ens.dtype).tiny))
            out["ensemble"] = stats_fn(ens_logits, labels, reference_probs=ens, mask=mask)
        if logits is not None:
            out["student"] = stats_fn(logits, labels, reference_probs=ens, mask=mask)
        if not out:
            raise ValueError(
                "Nothing to evaluate: no `student_apply`, no `teacher_apply` and no "
                "batch['teacher_logits']."
            )
        if axis_name is not None:
            out = jax.tree.map(lambda s: jax.lax.psum(s, axis_name), out)
        return out

    return eval_step


def _summarize(total: dict[str, MetricStats]) -> dict[str, dict[str, jax.Array]]:
    def compute(s):
        return compute_token_metrics(s) if isinstance(s, TokenStats) else compute_metrics(s)

    return {
        name: jax.vmap(compute)(s) if name == "teachers" else compute(s)
        for name, s in total.items()
    }


def evaluate(
    eval_step: Callable,
    params,
    batches: Iterable[dict],
    *,
    teacher_params=None,
    teacher_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Run `eval_step` over `batches` and return metrics side by side.

    Every batch is checked on the host first (`mtkd_jax.training.batch.check_batch`: labels in
    `[0, C)`, with C read from the step's output shape, non-empty batches), so an
    out-of-range label is an error naming it rather than a wrong accuracy or a NaN NLL.

    Args:
      eval_step: from `make_eval_step` (jitted here).
      params: student params (a Model student's variables, `mtkd_jax.variables_of(state)`;
        ignored when the step has no student).
      batches: an iterable of batches (all labeled, or masked with `label_mask`).
      teacher_params: passed to the teachers' apply.
      teacher_names: K names for the teacher rows; default ``teacher_0`` ... ``teacher_{K-1}``.

    Returns:
      `{"student": {...}, "<teacher name>": {...}, ..., "ensemble": {...}}`, each with
      accuracy, precision, recall, f1 (macro), nll, ece, agreement (with the ensemble) and n,
      as Python floats; for sequence batches accuracy, nll, perplexity, agreement and n
      per valid token.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.training.evaluation import make_eval_step, evaluate
      >>> step = make_eval_step(lambda p, x: x @ p, lambda tp, x: jnp.stack([x @ tp, -x @ tp]))
      >>> batches = [{"x": jnp.eye(2), "y": jnp.array([0, 1])}] * 3
      >>> r = evaluate(step, jnp.eye(2), batches, teacher_params=jnp.eye(2),
      ...              teacher_names=["good", "bad"])
      >>> sorted(r), r["good"]["accuracy"], r["bad"]["accuracy"], r["student"]["n"]
      (['bad', 'ensemble', 'good', 'student'], 1.0, 0.0, 6.0)
    """
    step, merge = jax.jit(eval_step), jax.jit(merge_stats)
    total, num_classes = None, None
    for batch in batches:
        if num_classes is None:
            shapes = jax.eval_shape(eval_step, params, batch, teacher_params=teacher_params)
            first = next(iter(shapes.values()))
            num_classes = None if isinstance(first, TokenStats) else first.confusion.shape[-1]
        check_batch(batch, num_classes=num_classes)
        stats = step(params, batch, teacher_params=teacher_params)
        total = stats if total is None else merge(total, stats)
    if total is None:
        raise ValueError("`batches` is empty: nothing to evaluate.")
    summary = jax.device_get(jax.jit(_summarize)(total))

    out = {}
    if "student" in summary:
        out["student"] = {name: float(v) for name, v in summary["student"].items()}
    if "teachers" in summary:
        k = summary["teachers"]["n"].shape[0]
        names = [f"teacher_{i}" for i in range(k)] if teacher_names is None else list(teacher_names)
        if len(names) != k:
            raise ValueError(f"`teacher_names` must have K={k} names, got {len(names)}.")
        for i, name in enumerate(names):
            out[name] = {m: float(v[i]) for m, v in summary["teachers"].items()}
        out["ensemble"] = {name: float(v) for name, v in summary["ensemble"].items()}
    return out
