"""Reference models and the helpers that turn any model into `apply_fn(params, x)`.

The rest of the library sees a model only as `apply_fn(params, x) -> logits [B, C]`; this
package holds the models and the glue, one job per module:

* `layers`: pooling by reshape (`max_pool_2x2`, `global_avg_pool`) and small shared functions;
* `linen`: the Flax Linen reference models `MLP`, `CNN1D`, `ConvNet`, `SmallConvNet`,
  `ResNet`;
* `registry`: `MODELS` (name -> model class) and `make_model`;
* `functional`: `init_params` and `apply_fn_of` for a Linen module, `nnx_apply_fn` for a
  Flax NNX module split with `nnx.split`;
* `counting`: `count_params`, `flops_per_example`.

Every name is importable from `mtkd_jax.models` directly.
"""

from mtkd_jax.models.counting import count_params, flops_per_example
from mtkd_jax.models.functional import apply_fn_of, init_params, nnx_apply_fn
from mtkd_jax.models.layers import global_avg_pool, max_pool_2x2
from mtkd_jax.models.linen import CNN1D, MLP, ConvNet, ResNet, SmallConvNet
from mtkd_jax.models.registry import MODELS, make_model

__all__ = [
    "MLP",
    "CNN1D",
    "ConvNet",
    "SmallConvNet",
    "ResNet",
    "MODELS",
    "make_model",
    "max_pool_2x2",
    "global_avg_pool",
    "init_params",
    "apply_fn_of",
    "nnx_apply_fn",
    "count_params",
    "flops_per_example",
]
