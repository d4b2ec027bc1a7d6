"""The reference models by name: `MODELS` and `make_model`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mtkd_jax import _checks
from mtkd_jax.models.linen import CNN1D, MLP, ConvNet, ResNet, SmallConvNet

__all__ = ["MODELS", "make_model"]


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "convnet": ConvNet,
    "small_convnet": SmallConvNet,
    "resnet": ResNet,
}
"""Name -> Linen model class, each built as `cls(num_classes=C, **kwargs)`."""


def make_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a reference model by its name in `MODELS`.

    Args:
      name: a key of `MODELS`.
      num_classes: C, the number of logits (>= 1).
      **kwargs: the model's other attributes, e.g. `features=(64,)` for "mlp".

    Returns:
      The Linen module (unbound; see `init_params` and `apply_fn_of`).

    Example:
      >>> from mtkd_jax.models import make_model
      >>> make_model("mlp", num_classes=10, features=(32,)).features
      (32,)
    """
    if name not in MODELS:
        raise ValueError(f"`name` must be one of {sorted(MODELS)}, got {name!r}.")
    return MODELS[name](num_classes=_checks.check_int(num_classes, "num_classes"), **kwargs)
