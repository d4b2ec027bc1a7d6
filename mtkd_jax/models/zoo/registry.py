"""The reference models by name: `MODELS` (Linen), `NNX_MODELS` (NNX) and `make_model`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx as fnnx

from mtkd_jax.core import checks as _checks
from mtkd_jax.models.zoo import nnx as nnx_models
from mtkd_jax.models.zoo.linen import CNN1D, MLP, ConvNet, ResNet, SmallConvNet

__all__ = ["MODELS", "NNX_MODELS", "make_model"]


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "convnet": ConvNet,
    "small_convnet": SmallConvNet,
    "resnet": ResNet,
}
"""Name -> Linen model class, each built as `cls(num_classes=C, **kwargs)`."""

NNX_MODELS: dict[str, type[fnnx.Module]] = {
    "mlp": nnx_models.MLP,
    "cnn1d": nnx_models.CNN1D,
    "convnet": nnx_models.ConvNet,
    "small_convnet": nnx_models.SmallConvNet,
    "resnet": nnx_models.ResNet,
}
"""Name -> NNX model class, each built as `cls(num_classes=C, **kwargs)` (input sizes and
`rngs` among the kwargs)."""

_APIS = {"linen": MODELS, "nnx": NNX_MODELS}


def make_model(name: str, *, num_classes: int, api: str = "linen", **kwargs: Any) -> Any:
    """Build a reference model by its name, in Flax Linen or Flax NNX.

    Args:
      name: a key of `MODELS` (the same names in `NNX_MODELS`).
      num_classes: C, the number of logits (>= 1).
      api: ``"linen"`` (an unbound module) or ``"nnx"`` (a module built now; pass its input
        size, e.g. `in_features=40`, and `rngs=nnx.Rngs(seed)`).
      **kwargs: the model's other arguments, e.g. `features=(64,)` for "mlp".

    Returns:
      The Linen module (see `linen_model`, `init_params`) or the NNX module (`nnx_split`).

    Example:
      >>> from flax import nnx
      >>> from mtkd_jax.models import make_model
      >>> make_model("mlp", num_classes=10, features=(32,)).features
      (32,)
      >>> type(make_model("mlp", num_classes=10, api="nnx", in_features=40,
      ...                 rngs=nnx.Rngs(0))).__name__
      'MLP'
    """
    if api not in _APIS:
        raise ValueError(f"`api` must be one of {sorted(_APIS)}, got {api!r}.")
    registry = _APIS[api]
    if name not in registry:
        raise ValueError(f"`name` must be one of {sorted(registry)}, got {name!r}.")
    return registry[name](num_classes=_checks.check_int(num_classes, "num_classes"), **kwargs)
