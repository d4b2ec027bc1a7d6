"""Reference models, and the one protocol of a model the library trains or runs.

The library sees a model as a `Model` (`protocol.py`): `apply(params, model_state, x, *,
train, key) -> (logits [B, C], model_state)`, built from a plain `apply_fn(params, x)`
(`as_model`), a Flax Linen module (`linen_model`) or a Flax NNX module (`nnx_split`); its
frozen, evaluation-mode form `eval_apply(variables, x)` is a plain apply function again.
The reference models live apart, in `zoo/` (`zoo.linen`, `zoo.nnx`: `MLP`, `CNN1D`,
`ConvNet`, `SmallConvNet`, `ResNet`; `zoo.token`: a small causal token model; `zoo.registry`:
`MODELS`, `NNX_MODELS`, `make_model`). The rest, one concept per module:

* `protocol`: `Model` (the protocol), `model_variables`, `function_model`;
* `linen_adapter`: `linen_model` (Linen modules as Models: mutable collections, dropout
  keys, the mode argument);
* `nnx_adapter`: `nnx_split` (NNX modules as Models: Dropout keys, BatchNorm statistics,
  train/eval mode, any `nnx.split` layout, K modules stacked);
* `adapt`: `as_model` (any of those, or a plain function) and `eval_apply_of`;
* `functional`: `init_params` and `apply_fn_of` for a stateless Linen module,
  `nnx_apply_fn` for a frozen NNX module split with `nnx.split`;
* `counting`: `count_params`, `flops_per_example`;
* `stacking`: K models of one architecture as one pytree with a leading K axis
  (`num_stacked`, `stack_params`, `unstack_params`);
* `transformer`: `Transformer` and `TransformerConfig`, the decoder-only transformer family
  (Llama / Qwen / Gemma options; presets in `transformer.preset`);
* `checkpoints`: `load_pretrained` (a published Llama / Qwen2 / Qwen3 / Gemma checkpoint
  directory as the `transformer.Transformer`, with its tokenizer), `tokenizer_fingerprint`;
  `checkpoint_config`: `transformer_config` (a `config.json` as a `TransformerConfig`).

Every name is importable from `mtkd_jax.models` directly.
"""

from mtkd_jax.models.adapt import as_model, eval_apply_of
from mtkd_jax.models.checkpoint_config import transformer_config
from mtkd_jax.models.checkpoints import Pretrained, load_pretrained, tokenizer_fingerprint
from mtkd_jax.models.counting import count_params, flops_per_example
from mtkd_jax.models.functional import apply_fn_of, init_params, nnx_apply_fn
from mtkd_jax.models.linen_adapter import linen_model, linen_variables
from mtkd_jax.models.nnx_adapter import nnx_split
from mtkd_jax.models.protocol import Model, function_model, model_variables
from mtkd_jax.models.transformer import Transformer, TransformerConfig
from mtkd_jax.models.zoo.layers import global_avg_pool, max_pool_2x2
from mtkd_jax.models.zoo.linen import CNN1D, MLP, ConvNet, ResNet, SmallConvNet
from mtkd_jax.models.zoo.registry import MODELS, NNX_MODELS, make_model

__all__ = [
    "MLP",
    "CNN1D",
    "ConvNet",
    "SmallConvNet",
    "ResNet",
    "MODELS",
    "NNX_MODELS",
    "make_model",
    "Model",
    "function_model",
    "as_model",
    "linen_model",
    "linen_variables",
    "nnx_split",
    "model_variables",
    "eval_apply_of",
    "max_pool_2x2",
    "global_avg_pool",
    "init_params",
    "apply_fn_of",
    "nnx_apply_fn",
    "count_params",
    "flops_per_example",
    "Transformer",
    "TransformerConfig",
    "Pretrained",
    "load_pretrained",
    "tokenizer_fingerprint",
    "transformer_config",
]
