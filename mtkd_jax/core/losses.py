r"""Per-example losses (unreduced, like optax's): soft MSE, temperature-scaled KL, CE, their mix.

Shapes: student logits `[..., C]` (`[B, C]`, or `[B, L, V]` for the tokens of a sequence),
targets `[..., C]` (probabilities), labels `[...]`. Float32 (or wider) whatever the models
compute in: bfloat16 inputs are upcast (`mtkd_jax.core.precision.at_least_float32`).

The hard/soft mix :math:`(1 - \alpha)\,\ell_{soft} + \alpha\,CE` is written once, in
`mix_losses`; `distillation_loss` is its per-example form. The batch means the steps use
(soft term over every example, CE over the labeled ones) are in `mtkd_jax.objective.loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.divergence import log_softmax_t, softmax_t
from mtkd_jax.core.precision import at_least_float32
from mtkd_jax.core.reduce import expand_to

__all__ = [
    "soft_mse",
    "soft_kl",
    "cross_entropy",
    "SOFT_LOSSES",
    "soft_loss_fn",
    "mix_losses",
    "distillation_loss",
    "per_teacher_soft_kl",
    "safe_labels",
]


def _check_pair(student_logits, targets):
    """Check a `[..., C]` pair and return both as arrays, at least float32."""
    student_logits, targets = jnp.asarray(student_logits), jnp.asarray(targets)
    _checks.check_float(student_logits, "student_logits")
    _checks.check_float(targets, "targets")
    student_logits, targets = at_least_float32(student_logits), at_least_float32(targets)
    _checks.check_same_classes(student_logits.shape, targets.shape, "student_logits", "targets")
    if student_logits.shape != targets.shape:
        raise ValueError(
            f"`student_logits` {student_logits.shape} and `targets` {targets.shape} must have the "
            "same shape [..., C]."
        )
    return student_logits, targets


def soft_mse(
    student_logits: jax.Array, targets: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    r"""The article's objective: squared error between probabilities, summed over classes.

    :math:`\ell = \sum_c (\mathrm{softmax}(s / T)_c - t_c)^2`.

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` target probabilities (e.g. `fuse_targets`).
      temperature: T > 0 applied to the student.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import soft_mse
      >>> soft_mse(jnp.zeros(2), jnp.array([1.0, 0.0]))
      Array(0.5, dtype=float32)
    """
    student_logits, targets = _check_pair(student_logits, targets)
    q = softmax_t(student_logits, temperature=temperature)
    return jnp.sum(jnp.square(q - targets), axis=-1)


def soft_kl(
    student_logits: jax.Array, targets: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    r"""Temperature-scaled KL (Hinton et al., 2015): :math:`T^2\,KL(t \| \mathrm{softmax}(s/T))`.

    :math:`\ell = T^2 \sum_c t_c (\log t_c - \log\mathrm{softmax}(s/T)_c)`, with terms where
    :math:`t_c = 0` contributing 0. The :math:`T^2` keeps gradient magnitudes comparable
    across temperatures (TextBrewer omits it: divide by :math:`T^2`, or scale its learning
    rate by :math:`T^2`, to compare). Computed in log space.

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` target probabilities (already at temperature T). A NaN target
        gives a NaN loss (it is not hidden by the zero-mass rule).
      temperature: T > 0 applied to the student, and the `T^2` factor.

    Returns:
      `[...]` per-example loss, >= 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import soft_kl
      >>> soft_kl(jnp.zeros(2), jnp.array([0.5, 0.5]), temperature=4.0)
      Array(0., dtype=float32)
    """
    student_logits, targets = _check_pair(student_logits, targets)
    log_q = log_softmax_t(student_logits, temperature=temperature)
    # No mass (<= 0: exact zeros, and rounding-level negatives of a fused target) adds 0; a
    # NaN target fails both comparisons and must show in the value, not only in the
    # gradient, so that a bad teacher is caught at the step that produced it.
    zero = targets <= 0
    safe_t = jnp.where(zero, 1.0, targets)
    kl = jnp.sum(jnp.where(zero, 0.0, targets * (jnp.log(safe_t) - log_q)), axis=-1)
    return jnp.square(temperature) * kl


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Cross-entropy with integer labels: :math:`-\log\mathrm{softmax}(z)_y`.

    Args:
      logits: `[..., C]`.
      labels: `[...]` integers in `[0, C)`.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import cross_entropy
      >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2])).round(4)
      Array([1.3863], dtype=float32)
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _checks.check_float(logits, "logits")
    _checks.check_labels(labels, "labels", logits.shape[:-1])
    return _cross_entropy(at_least_float32(logits), labels)


@jax.custom_jvp
def _cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    r""":math:`\mathrm{logsumexp}(z) - z_y`, `[..., C]` -> `[...]`."""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]


@_cross_entropy.defjvp
def _cross_entropy_jvp(primals, tangents):
    # The tangent :math:`\sum_c (p_c - 1[c = y])\,\dot z_c` is written with a one-hot
    # comparison rather than a gather, so its transpose (the gradient) is one elementwise
    # fusion, :math:`g\,(p - 1[c = y])`, where the gather's transpose is a scatter into a
    # zeroed `[..., C]` array (slower on CPU; benchmarks/RESULTS.md). Forward mode and
    # higher derivatives work as usual (a `custom_jvp`, not a `custom_vjp`).
    z, y = primals
    dz = tangents[0]
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    out = lse[..., 0] - jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    hit = jax.lax.broadcasted_iota(y.dtype, z.shape, z.ndim - 1) == y[..., None]
    return out, jnp.sum((jnp.exp(z - lse) - hit.astype(z.dtype)) * dz, axis=-1)


SOFT_LOSSES: dict[str, Callable[..., jax.Array]] = {"kl": soft_kl, "mse": soft_mse}
"""Name -> soft loss `fn(student_logits, targets, *, temperature) -> [...]`."""


def soft_loss_fn(soft_loss: str | Callable) -> Callable[..., jax.Array]:
    """The soft loss named `soft_loss` (a key of `SOFT_LOSSES`); a function is returned as
    given. The one place a soft-loss name is checked: the step factories resolve it once when
    they are built and pass the function on.

    Example:
      >>> from mtkd_jax.core.losses import soft_kl, soft_loss_fn
      >>> soft_loss_fn("kl") is soft_kl
      True
    """
    if callable(soft_loss):
        return soft_loss
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"`soft_loss` must be one of {sorted(SOFT_LOSSES)}, got {soft_loss!r}.")
    return SOFT_LOSSES[soft_loss]


def mix_losses(soft: jax.Array, hard: jax.Array, *, alpha: float | jax.Array) -> jax.Array:
    r"""The hard/soft mix :math:`(1-\alpha)\,\ell_{soft} + \alpha\,\ell_{hard}`.

    The one place the mix is written (steps, codistillation and `distillation_loss` use it).

    Args:
      soft: soft (distillation) loss, any shape.
      hard: hard-label loss, broadcastable against `soft`.
      alpha: weight of the hard-label term, in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import mix_losses
      >>> float(mix_losses(jnp.float32(2.0), jnp.float32(4.0), alpha=0.25))
      2.5
    """
    _checks.check_unit_interval(alpha, "alpha")
    return (1.0 - alpha) * soft + alpha * hard


def safe_labels(labels, label_mask):
    """Unlabeled rows may hold placeholder labels (e.g. -1); index 0 keeps their CE finite."""
    return labels if label_mask is None else jnp.where(jnp.asarray(label_mask) > 0, labels, 0)


def distillation_loss(
    student_logits: jax.Array,
    targets: jax.Array,
    labels: jax.Array | None = None,
    *,
    alpha: float | jax.Array = 0.0,
    temperature: float | jax.Array = 1.0,
    soft_loss: str = "kl",
    label_mask: jax.Array | None = None,
) -> jax.Array:
    r"""Per-example hard-label CE mixed with a soft loss: :math:`\alpha\,CE + (1-\alpha)\,\ell`.

    With `label_mask`, the CE term of unlabeled examples (mask 0) is 0: the plain mean of
    this per-example loss then weights the CE by the labeled fraction of the batch.
    `mean_distillation_loss` instead takes the CE mean over the labeled examples only (what
    the library's steps do).

    Args:
      student_logits: `[..., C]`.
      targets: `[..., C]` teacher target probabilities.
      labels: `[...]` integer labels; needed when `alpha` is not exactly 0.
      alpha: weight of the hard-label term, in [0, 1].
      temperature: T > 0 for the soft term.
      soft_loss: ``"kl"`` (`soft_kl`, with the T^2 factor) or ``"mse"`` (`soft_mse`).
      label_mask: optional `[...]`, 1 for labeled examples.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import distillation_loss
      >>> s = jnp.zeros((1, 2)); t = jnp.array([[0.5, 0.5]]); y = jnp.array([0])
      >>> distillation_loss(s, t, y, alpha=0.5, temperature=2.0).round(4)
      Array([0.3466], dtype=float32)
    """
    soft_fn = soft_loss_fn(soft_loss)
    _checks.check_unit_interval(alpha, "alpha")
    soft = soft_fn(student_logits, targets, temperature=temperature)
    _checks.check_labels_for_alpha(labels, alpha)
    if labels is None:
        return soft
    hard = cross_entropy(student_logits, safe_labels(labels, label_mask))
    if label_mask is not None:
        hard = hard * jnp.asarray(label_mask, hard.dtype)
    return mix_losses(soft, hard, alpha=alpha)


def per_teacher_soft_kl(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    weights: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    r"""Weighted mean of per-teacher KLs: :math:`\sum_k w_k\,T^2 KL(p_k \| q)`.

    This is how tools that "sum per-teacher losses" fuse teachers. Its gradient in the
    student logits equals that of `soft_kl(s, fuse_targets(p, w))` (the cross-entropy part is
    linear in the target), but its value is larger by a term that does not depend on the
    student, the teachers' generalized Jensen-Shannon divergence:
    :math:`\sum_k w_k KL(p_k\|q) = KL(\bar p\|q) + \sum_k w_k KL(p_k\|\bar p)`,
    :math:`\bar p = \sum_k w_k p_k`. Loss curves of the two are therefore not comparable.

    Args:
      student_logits: `[..., C]`.
      teacher_probs: `[K, ..., C]` at temperature T.
      weights: `[K]` or `[K, ...]` summing to 1 over K.
      temperature: T > 0.

    Returns:
      `[...]` per-example loss.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.core.losses import per_teacher_soft_kl
      >>> p = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
      >>> per_teacher_soft_kl(jnp.zeros((1, 2)), p, jnp.array([0.5, 0.5])).round(4)
      Array([0.6931], dtype=float32)
    """
    student_logits = jnp.asarray(student_logits)
    teacher_probs, weights = jnp.asarray(teacher_probs), jnp.asarray(weights)
    _checks.check_float(student_logits, "student_logits")
    _checks.check_teachers(teacher_probs, "teacher_probs")
    _checks.check_same_classes(
        student_logits.shape, teacher_probs.shape, "student_logits", "teacher_probs"
    )
    if student_logits.shape != teacher_probs.shape[1:]:
        raise ValueError(
            f"`student_logits` must have shape [..., C]={teacher_probs.shape[1:]}, the shape of "
            f"`teacher_probs` {teacher_probs.shape} without its teacher axis; got "
            f"{student_logits.shape}."
        )
    _checks.check_weights(weights, "weights", teacher_probs.shape, "teacher_probs")
    per = soft_kl(
        jnp.broadcast_to(student_logits, teacher_probs.shape), teacher_probs,
        temperature=temperature,
    )  # [K, ...]
    return jnp.sum(expand_to(jnp.asarray(weights, per.dtype), per.ndim) * per, axis=0)
