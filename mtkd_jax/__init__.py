"""mtkd_jax: multi-teacher knowledge distillation for JAX/Flax.

The functional core (pure functions over arrays, teacher axis first `[K, ..., C]`):

* `softmax_t`, `pairwise_divergence`: teacher predictions and their differences;
* `mtkd_jax.weighting`: teacher weights (uniform, static, from scores, confidence, entropy,
  agreement);
* `fuse_targets`, `leave_one_out_targets`, `fuse_logits`: distillation targets;
* `mtkd_jax.losses`: per-example soft losses (`soft_kl`, `soft_mse`), CE, their mix.
"""

from mtkd_jax import losses, weighting
from mtkd_jax.divergence import DIVERGENCES, log_softmax_t, pairwise_divergence, softmax_t
from mtkd_jax.losses import (
    cross_entropy,
    distillation_loss,
    per_teacher_soft_kl,
    soft_kl,
    soft_mse,
)
from mtkd_jax.targets import fuse_logits, fuse_targets, leave_one_out_targets

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "cross_entropy",
    "distillation_loss",
    "fuse_logits",
    "fuse_targets",
    "leave_one_out_targets",
    "log_softmax_t",
    "losses",
    "pairwise_divergence",
    "per_teacher_soft_kl",
    "soft_kl",
    "soft_mse",
    "softmax_t",
    "weighting",
]
