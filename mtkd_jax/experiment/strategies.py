"""The rows of the comparison: how each is trained, by name (`Strategy`, `parse_strategy`)."""

from __future__ import annotations

import dataclasses

from mtkd_jax.core.losses import SOFT_LOSSES

__all__ = ["Strategy", "STRATEGIES", "parse_strategy", "strategy_names"]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How one row of the comparison is trained.

    Attributes:
      name: the row's name, as given in `config.distill.strategies`.
      kind: ``"supervised"`` (the student alone, hard labels only), ``"distill"`` (the
        student from the teachers' fused target) or ``"codistill"`` (the K teachers refine
        each other toward their leave-one-out targets: the article's worked project).
      weighting: for "distill", a name in `mtkd_jax.weighting.WEIGHTINGS` (``"uniform"``,
        ``"from_scores"``, ``"confidence"``, ``"entropy"``, ``"agreement"``).
      teachers: ``"all"``, or ``"best"`` for the single teacher with the best validation
        accuracy (single-teacher distillation, the baseline multi-teacher KD must beat).
      soft_loss: ``"kl"``, ``"mse"`` (the article's squared error), or None for the config's.
      description: one line for the report.
      target: the name of the target the row learns from; rows that differ only in their
        soft loss (``mean`` and ``mean_mse``) share one. Defaults to `name`.
    """

    name: str
    kind: str
    weighting: str = "uniform"
    teachers: str = "all"
    soft_loss: str | None = None
    description: str = ""
    target: str = ""

    def __post_init__(self):
        if not self.target:
            object.__setattr__(self, "target", self.name)


_BASE = (
    Strategy("alone", "supervised", description="student trained alone on the labels"),
    Strategy("best_teacher", "distill", teachers="best",
             description="student distilled from the best single teacher (by validation)"),
    Strategy("mean", "distill", "uniform",
             description="mean of the teachers' probabilities (the article's target)"),
    Strategy("scores", "distill", "from_scores",
             description="performance-weighted mean, lambda = softmax(val. accuracy / tau)"),
    Strategy("confidence", "distill", "confidence",
             description="per-example weights from each teacher's CE on the label (CA-MKD)"),
    Strategy("entropy", "distill", "entropy",
             description="per-example weights favouring low-entropy teachers (EBKD)"),
    Strategy("agreement", "distill", "agreement",
             description="per-example weights favouring teachers that agree with the rest"),
    # Label-free routing (mtkd_jax.weighting.routing), for teachers from different sources;
    # temperatures and the gate are fitted in experiment/multi_source.py.
    Strategy("energy", "distill", "energy",
             description="route by each teacher's energy logsumexp(z) (label-free)"),
    Strategy("max_logit", "distill", "max_logit",
             description="route by each teacher's max logit (label-free)"),
    Strategy("calibrated", "distill", "calibrated",
             description="route by calibrated confidence, tau_k fitted per teacher (label-free)"),
    Strategy("gate", "distill", "gate",
             description="route by a gate over the teachers' outputs, fitted on the labeled "
                         "splits as a mixture of experts (label-free on the transfer set)"),
    Strategy("codistill", "codistill",
             description="the K teachers refine each other toward leave-one-out targets"),
)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in _BASE}
"""Base strategies by name. Any "distill" strategy also exists with an ``_mse`` (the
article's squared-error objective) or ``_kl`` suffix that fixes its soft loss."""


def strategy_names() -> list[str]:
    """Every valid strategy name: the base ones and the ``_kl``/``_mse`` variants.

    Example:
      >>> from mtkd_jax.experiment.strategies import strategy_names
      >>> "mean_mse" in strategy_names(), "alone_mse" in strategy_names()
      (True, False)
    """
    names = list(STRATEGIES)
    for s in _BASE:
        if s.kind == "distill":
            names += [f"{s.name}_{loss}" for loss in sorted(SOFT_LOSSES)]
    return names


def parse_strategy(name: str) -> Strategy:
    """The `Strategy` for a name; an unknown name raises a ValueError listing the valid ones.

    Example:
      >>> from mtkd_jax.experiment.strategies import parse_strategy
      >>> s = parse_strategy("mean_mse")
      >>> s.kind, s.weighting, s.soft_loss
      ('distill', 'uniform', 'mse')
    """
    if name in STRATEGIES:
        return STRATEGIES[name]
    base, _, loss = name.rpartition("_")
    if base in STRATEGIES and STRATEGIES[base].kind == "distill" and loss in SOFT_LOSSES:
        return dataclasses.replace(
            STRATEGIES[base], name=name, soft_loss=loss,
            description=f"{STRATEGIES[base].description}; {loss.upper()} objective",
        )
    raise ValueError(f"Unknown strategy {name!r}; valid strategies: {strategy_names()}.")
