"""A small causal token model in Flax NNX that exposes features and an output head.

`CausalTokenModel`: token embedding, `depth` causal convolutions over the last `context`
tokens (left-padded, so position i sees tokens <= i only) with GELU and residuals, a
LayerNorm, then a linear head to the vocabulary. `features(x)` gives `[B, L, H]`,
`head(f)` the logits `[B, L, V]`, `model(x)` both: what the chunked distillation loss
needs (`make_distill_step(..., student_head=...)`, `mtkd_jax.objective.loss`).

`token_model_fns` turns a module into plain functions over its params (`nnx.split`):
`logits(params, x)`, `features(params, x)`, `head(params, f)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CausalTokenModel", "TokenModelFns", "token_model_fns"]


class CausalTokenModel(nnx.Module):
    """Causal convolutional next-token model.

    Args:
      vocab_size: V.
      dim: H, the width of the features.
      depth: number of causal convolution blocks.
      context: kernel size of each convolution (the receptive field is
        `depth * (context - 1) + 1` tokens).
      rngs: `nnx.Rngs`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.token import CausalTokenModel
      >>> m = CausalTokenModel(16, dim=8, rngs=nnx.Rngs(0))
      >>> x = jnp.zeros((2, 5), jnp.int32)
      >>> m.features(x).shape, m(x).shape
      ((2, 5, 8), (2, 5, 16))
    """

    def __init__(self, vocab_size: int, *, dim: int = 32, depth: int = 2, context: int = 3,
                 rngs: nnx.Rngs):
        self.context = context
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.convs = nnx.List([
            nnx.Conv(dim, dim, kernel_size=(context,), padding=((context - 1, 0),), rngs=rngs)
            for _ in range(depth)
        ])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab_size, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """`[B, L]` int tokens -> `[B, L, H]` causal features."""
        h = self.embed(jnp.asarray(x, jnp.int32))
        for conv in self.convs:
            h = h + jax.nn.gelu(conv(h))
        return self.norm(h)

    def head(self, f: jax.Array) -> jax.Array:
        """`[..., H]` features -> `[..., V]` float32 logits."""
        return self.out(f).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class TokenModelFns(NamedTuple):
    """Plain functions of a token model's params (from `token_model_fns`)."""

    logits: Callable[..., jax.Array]
    features: Callable[..., jax.Array]
    head: Callable[..., jax.Array]


def token_model_fns(module: CausalTokenModel) -> tuple[TokenModelFns, nnx.State]:
    """`(TokenModelFns, params)` of a module: `fns.logits(params, x)`, `fns.features(params,
    x)`, `fns.head(params, f)`, all pure (`nnx.merge` of the graph and the params).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.token import CausalTokenModel, token_model_fns
      >>> fns, params = token_model_fns(CausalTokenModel(16, dim=8, rngs=nnx.Rngs(0)))
      >>> x = jnp.ones((2, 5), jnp.int32)
      >>> bool(jnp.allclose(fns.head(params, fns.features(params, x)), fns.logits(params, x)))
      True
    """
    graphdef, params = nnx.split(module, nnx.Param)

    def merged(params):
        return nnx.merge(graphdef, params)

    return TokenModelFns(
        logits=lambda p, x: merged(p)(x),
        features=lambda p, x: merged(p).features(x),
        head=lambda p, f: merged(p).head(f),
    ), params
