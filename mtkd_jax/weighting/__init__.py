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

Scale conventions of other implementations (the formulas match; the scale does not):
CA-MKD and big_vision **sum** per-teacher losses (K times a weighted mean: multiply the
learning rate, or `1 - alpha`, by K to match); EBKD's entropy weights are not divided by
K - 1 (a factor K - 1 on the soft loss); TextBrewer has no T^2 factor on its KL (divide the
soft loss by T^2, see `mtkd_jax.core.losses.soft_kl`).
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
