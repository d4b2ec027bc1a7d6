"""Stages 2-4 of a seed: the teachers' predictions, their divergences, the targets.

2. the K teachers' predictions on the validation and test sets, and the test rows of the
   teachers and their ensemble;
3. the pairwise divergence matrix of their validation predictions, per kind;
4. the distillation targets of every strategy on the validation set (mean,
   performance-weighted, confidence, entropy, agreement, leave-one-out) and how good each is,
   and the teacher weighting every student row is distilled with.

Engine call: `mtkd_jax.objective.targets.distill_targets` (`_targets`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax.core.divergence import pairwise_divergence, softmax_t
from mtkd_jax.experiment.config import Strategy, parse_strategy
from mtkd_jax.experiment.context import Context, predict
from mtkd_jax.experiment.multi_source import ROUTING, routing_weightings
from mtkd_jax.experiment.teachers import Teachers, teacher_names
from mtkd_jax.metrics import batch_stats, compute_metrics
from mtkd_jax.objective.targets import distill_targets, leave_one_out_targets
from mtkd_jax.weighting import get_weighting

__all__ = [
    "Analysis",
    "analyse",
    "analyse_teachers",
    "evaluate_logits",
    "log_probs",
    "softmax_np",
    "target_name",
]


@jax.jit
def _metric_values(logits, labels, reference_probs):
    return compute_metrics(batch_stats(logits, labels, reference_probs=reference_probs))


def evaluate_logits(
    logits: jax.Array, labels: jax.Array, reference_probs: jax.Array | None = None
) -> dict[str, float]:
    """Test metrics of one model's logits as Python floats (see `METRICS`).

    Args:
      logits: `[N, C]` logits (or log-probabilities).
      labels: `[N]` int labels.
      reference_probs: `[N, C]` distribution to measure agreement with (the teacher
        ensemble); agreement is NaN without it.

    Returns:
      `{"accuracy", "precision", "recall", "f1", "nll", "ece", "agreement", "n"}`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.experiment import evaluate_logits
      >>> m = evaluate_logits(jnp.array([[2.0, 0.0], [0.0, 2.0]]), jnp.array([0, 0]),
      ...                     jnp.array([[0.9, 0.1], [0.9, 0.1]]))
      >>> m["accuracy"], m["agreement"], m["n"]
      (0.5, 0.5, 2.0)
    """
    ref = jnp.exp(jax.nn.log_softmax(logits)) if reference_probs is None else reference_probs
    values = jax.device_get(_metric_values(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(labels, jnp.int32),
                                           jnp.asarray(ref, jnp.float32)))
    out = {k: float(v) for k, v in values.items()}
    if reference_probs is None:
        out["agreement"] = float("nan")
    return out


def log_probs(probs: np.ndarray) -> np.ndarray:
    """`log(probs)`, zeros clipped to the smallest float32."""
    return np.log(np.maximum(probs, np.finfo(np.float32).tiny))


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, as numpy."""
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


# Jitted once each: run eagerly, every primitive would be compiled on its own.
_targets = jax.jit(distill_targets, static_argnames=("temperature", "weighting"))
_mean_divergence = jax.jit(lambda probs, kind: jnp.mean(pairwise_divergence(probs, kind=kind), 0),
                           static_argnames=("kind",))


@jax.jit
def _mean_entropy(probs):
    return -jnp.mean(jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1)),
                                       0.0), axis=-1))


def target_name(strategy: Strategy) -> str:
    """The name of a distillation strategy's target: rows that differ only in their loss
    (``mean`` and ``mean_mse``) share one.

    Example:
      >>> from mtkd_jax.experiment.config import parse_strategy
      >>> from mtkd_jax.experiment import target_name
      >>> target_name(parse_strategy("mean_mse")), target_name(parse_strategy("best_teacher"))
      ('mean', 'best_teacher')
    """
    return strategy.target


def analyse_teachers(val_logits: np.ndarray, val_y: np.ndarray, strategies, *, kinds,
                     temperature: float, weightings: dict[str, Callable], best: int):
    """Divergence matrices, target quality and teacher weights on the validation set.

    Args:
      val_logits: `[K, N, C]` teacher logits on the validation set.
      val_y: `[N]` labels.
      strategies: the distillation `Strategy` rows.
      kinds: divergence kinds to compute.
      temperature: the distillation temperature (weights are those the student gets).
      weightings: strategy name -> weighting function.
      best: index of the best teacher (by validation accuracy).

    Returns:
      `(divergence {kind: [K, K]}, targets {target: {...}}, weights {target: [K, N]})`, the
      last two keyed by `target_name`; leave-one-out targets as ``leave_one_out[k]``.
    """
    z = jnp.asarray(val_logits)
    y = jnp.asarray(val_y)
    k = z.shape[0]
    probs = softmax_t(z)  # the article's predictions, T = 1
    divergence = {kind: np.asarray(_mean_divergence(probs, kind=kind)).tolist()
                  for kind in kinds}
    targets, weights = {}, {}
    for s in strategies:
        name = target_name(s)
        if s.kind != "distill" or name in targets:
            continue
        if s.teachers == "best":
            fused = probs[best]
            w = np.zeros((k, z.shape[1]), np.float32)
            w[best] = 1.0
        else:
            fn = weightings[s.name]
            fused = _targets(z, y, temperature=1.0, weighting=fn).targets
            w = np.asarray(_targets(z, y, temperature=temperature, weighting=fn).weights)
        weights[name] = w
        m = evaluate_logits(log_probs(np.asarray(fused)), y)
        targets[name] = {
            "accuracy": m["accuracy"],
            "nll": m["nll"],
            "ece": m["ece"],
            "entropy": float(_mean_entropy(fused)),
            "max_weight": float(np.mean(np.max(w, axis=0))),
        }
    if k >= 2:
        loo = leave_one_out_targets(probs)  # [K, N, C]
        for i in range(k):
            m = evaluate_logits(log_probs(np.asarray(loo[i])), y)
            targets[f"leave_one_out[{i}]"] = {
                "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                "entropy": float(_mean_entropy(loo[i])),
                "max_weight": float("nan"),  # no weights: the plain mean of the others
            }
    return divergence, targets, weights


class Analysis(NamedTuple):
    """What stages 2-4 give the students and the seed's result.

    Attributes:
      rows: test metrics of ``teacher_<k>``, ``teachers (mean)`` and ``ensemble``.
      ensemble_probs: `[N_test, C]` the teachers' mean probabilities on the test set, which
        every row's agreement is measured against.
      val_accuracy: `[K]` the teachers' validation accuracies.
      best: index of the best teacher by validation accuracy.
      weightings: distillation strategy name -> its weighting function (the scores of the
        performance weights are `val_accuracy`).
      divergence, targets, weights: see `analyse_teachers`.
    """

    rows: dict[str, dict[str, float]]
    ensemble_probs: np.ndarray
    val_accuracy: np.ndarray
    best: int
    weightings: dict[str, Callable]
    divergence: dict[str, list[list[float]]]
    targets: dict[str, dict[str, float]]
    weights: dict[str, np.ndarray]


def _weightings(config, strategies, val_acc) -> dict[str, Callable]:
    """Strategy name -> weighting function of every distillation row, with and without the
    transfer set."""
    no_transfer = [parse_strategy(n) for n in config.distill.train_only]
    weightings = {}
    for s in [*strategies, *no_transfer]:
        if s.kind != "distill" or s.weighting in ROUTING:  # routing: fitted in multi_source
            continue
        if s.weighting == "from_scores":
            weightings[s.name] = get_weighting(
                "from_scores", scores=jnp.asarray(val_acc, jnp.float32),
                temperature=config.distill.scores_temperature,
            )
        else:
            weightings[s.name] = get_weighting(s.weighting)
    return weightings


def analyse(ctx: Context, teachers: Teachers, strategies) -> Analysis:
    """Stages 2-4: the teachers' predictions, their test rows, divergences and targets."""
    config, dataset = ctx.config, ctx.ds
    k = config.teachers.num
    names = teacher_names(k)
    val_logits = predict(teachers.apply, teachers.params, dataset.validation.x)
    test_logits = predict(teachers.apply, teachers.params, dataset.test.x)
    val_acc = np.mean(np.argmax(val_logits, -1) == dataset.validation.y[None], axis=-1)
    test_y = dataset.test.y
    ens = np.mean(softmax_np(test_logits), axis=0)
    rows = {}
    for i, name in enumerate(names):
        rows[name] = evaluate_logits(test_logits[i], test_y, ens)
    rows["teachers (mean)"] = {m: float(np.mean([rows[n][m] for n in names]))
                               for m in rows[names[0]]}
    rows["ensemble"] = evaluate_logits(log_probs(ens), test_y, ens)

    best = int(np.argmax(val_acc))
    weightings = _weightings(config, strategies, val_acc)
    weightings.update(routing_weightings(ctx, teachers, strategies, val_logits))  # fitted routing
    divergence, targets, weights = analyse_teachers(
        val_logits, dataset.validation.y, strategies,
        kinds=tuple(config.analysis.divergence_kinds) if k >= 2 else (),
        temperature=config.distill.temperature, weightings=weightings,
        best=best,
    )
    return Analysis(rows, ens, val_acc, best, weightings, divergence, targets, weights)
