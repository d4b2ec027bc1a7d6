r"""Teacher weights: how much each teacher counts, overall or per example.

One protocol for every strategy::

    fn(probs [K, ..., C], *, logits=None, labels=None, label_mask=None, **hyperparameters)
        -> weights [K, ...] (or [K], broadcast over the examples)

`probs` are the teacher probabilities at the distillation temperature T, `logits` the raw
teacher logits `[K, ..., C]` (T = 1), `labels` `[...]` integer labels and `label_mask`
`[...]` (1 = labeled; examples with 0 have no label). The weights are non-negative and sum
to 1 over the leading teacher axis, ready for `mtkd_jax.fuse_targets`. Hyperparameters are
keyword-only. Strategies are registered by name in `WEIGHTINGS`; `register_weighting` adds
one (a new strategy is one function and one test: the property tests run over the registry),
and `get_weighting(name, **hyperparameters)` binds hyperparameters, checked against the
function's signature.

Label-free routing (`mtkd_jax.weighting.routing`, `mtkd_jax.weighting.gate`): ``energy``,
``max_logit``, ``calibrated`` and ``gate`` weight each example by what the teachers can tell
from the input alone (for teachers from different sources, `mtkd_jax.core.class_sets`);
`fit_temperature` and `fit_gate` fit their hyperparameters.

Scale conventions of other implementations (the formulas match; the scale does not). The
library's soft loss is the batch mean of :math:`T^2 KL(\sum_k w_k p_k \| q)` with weights
summing to 1 (its gradient is that of :math:`\sum_k w_k T^2 KL(p_k \| q)`,
`mtkd_jax.core.losses.per_teacher_soft_kl`):

* CA-MKD divides its weighted sum of per-teacher losses by batch size x K: its soft loss
  is `per_teacher_soft_kl`'s batch mean divided by K, and its gradient the library's
  divided by K (multiply its soft-loss weight or learning rate by K to get the library's);
* EBKD (as CA-MKD's code computes it) does not divide its entropy weights by K - 1 (they
  sum to K - 1) and reduces the same way: (K - 1)/K of the library's;
* big_vision sums the per-teacher losses: K times the library's (uniform weights);
* TextBrewer has no T^2 factor on its KL (divide the soft loss by T^2, see
  `mtkd_jax.core.losses.soft_kl`).

Checked against float64 reimplementations of each reduction in
`tests/test_weighting.py::test_scale_conventions_of_the_anchors`.
"""

from mtkd_jax.weighting.gate import fit_gate, gate, gate_features, gate_inputs
from mtkd_jax.weighting.registry import (
    PROTOCOL_KEYWORDS,
    WEIGHTINGS,
    get_weighting,
    register_weighting,
)
from mtkd_jax.weighting.routing import calibrated, energy, fit_temperature, max_logit
from mtkd_jax.weighting.strategies import (
    agreement,
    confidence,
    entropy,
    from_scores,
    posterior,
    static,
    uniform,
)

__all__ = [
    "uniform",
    "static",
    "from_scores",
    "confidence",
    "entropy",
    "agreement",
    "posterior",
    "energy",
    "max_logit",
    "calibrated",
    "gate",
    "gate_features",
    "gate_inputs",
    "fit_temperature",
    "fit_gate",
    "WEIGHTINGS",
    "PROTOCOL_KEYWORDS",
    "register_weighting",
    "get_weighting",
]
