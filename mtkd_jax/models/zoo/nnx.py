"""The reference models in Flax NNX: MLP, CNN1D, ConvNet, SmallConvNet, ResNet.

The same networks as `mtkd_jax.models.zoo.linen`, layer for layer (same initialisers, SAME
padding, pooling by reshape, float32 logits `[B, C]` whatever the compute `dtype`), so a
Linen model's params copied into the NNX one give the same logits. NNX modules know their
input sizes: `in_features` (MLP, the flattened size), `in_length` and `in_channels` (CNN1D),
`in_channels` (the image models). `MLP` and `CNN1D` take `dropout=` and `batch_norm=True`;
the library sets train/eval mode on every call (`mtkd_jax.models.nnx_split`), and a module
used on its own follows NNX's `module.train()` / `module.eval()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from mtkd_jax.models.zoo.layers import (
    Dtype,
    as_images,
    float32_logits,
    global_avg_pool,
    max_pool_2x2,
)

__all__ = ["MLP", "CNN1D", "ConvNet", "SmallConvNet", "ResNet"]


def _norm(features: int, on: bool, dtype, rngs) -> nnx.Module | None:
    return nnx.BatchNorm(features, dtype=dtype, rngs=rngs) if on else None


def _chain(make, sizes: Sequence[int]) -> nnx.List:
    """`make(a, b)` for each consecutive pair of sizes: the layers of a stack."""
    return nnx.List([make(a, b) for a, b in zip(sizes, sizes[1:], strict=False)])


class MLP(nnx.Module):
    """Dense(-BatchNorm)-ReLU(-Dropout) layers over the flattened input, then a linear classifier.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.nnx import MLP
      >>> MLP(4, 3, features=(8,), rngs=nnx.Rngs(0))(jnp.zeros((5, 4))).shape
      (5, 3)
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        features: Sequence[int] = (128, 128),
        dropout: float = 0.0,
        batch_norm: bool = False,
        dtype: Dtype | None = None,
        rngs: nnx.Rngs,
    ):
        widths = (in_features, *features)
        self.dense = _chain(lambda a, b: nnx.Linear(a, b, dtype=dtype, rngs=rngs), widths)
        self.norms = nnx.List([_norm(w, batch_norm, dtype, rngs) for w in features])
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.out = nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for dense, norm in zip(self.dense, self.norms, strict=True):
            x = dense(x)
            x = jax.nn.relu(x if norm is None else norm(x))
            if self.dropout is not None:
                x = self.dropout(x)
        return float32_logits(self.out(x))


class CNN1D(nnx.Module):
    """A 1-D CNN for MNIST-1D, as `mtkd_jax.models.zoo.linen.CNN1D` (conv(-BatchNorm)-ReLU, pool
    from the second conv on, flatten, dense-ReLU(-Dropout), dense).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.nnx import CNN1D
      >>> CNN1D(40, 10, rngs=nnx.Rngs(0))(jnp.zeros((2, 40))).shape
      (2, 10)
    """

    def __init__(
        self,
        in_length: int,
        num_classes: int,
        *,
        in_channels: int = 1,
        features: Sequence[int] = (32, 32, 64),
        kernel_size: int = 5,
        hidden: int = 128,
        dropout: float = 0.0,
        batch_norm: bool = False,
        dtype: Dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.convs = _chain(
            lambda a, b: nnx.Conv(a, b, (kernel_size,), dtype=dtype, rngs=rngs),
            (in_channels, *features),
        )
        self.norms = nnx.List([_norm(w, batch_norm, dtype, rngs) for w in features])
        length = in_length
        for _ in features[1:]:
            length //= 2
        flat = length * features[-1]
        self.hidden = nnx.Linear(flat, hidden, dtype=dtype, rngs=rngs) if hidden else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout and hidden else None
        self.out = nnx.Linear(hidden or flat, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"`x` must be [B, L] or [B, L, F], got shape {x.shape}.")
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = conv(x)
            x = jax.nn.relu(x if norm is None else norm(x))
            if i > 0:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        if self.hidden is not None:
            x = jax.nn.relu(self.hidden(x))
            if self.dropout is not None:
                x = self.dropout(x)
        return float32_logits(self.out(x))


def _conv3(a: int, b: int, dtype, rngs, **kwargs) -> nnx.Conv:
    return nnx.Conv(a, b, (3, 3), padding="SAME", dtype=dtype, rngs=rngs, **kwargs)


class ConvNet(nnx.Module):
    """The benchmark teacher, as `mtkd_jax.models.zoo.linen.ConvNet`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.nnx import ConvNet
      >>> ConvNet(3, 10, widths=(8, 16), rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8, 3))).shape
      (2, 10)
    """

    def __init__(self, in_channels: int, num_classes: int, *, widths: Sequence[int] = (64, 128),
                 dtype: Dtype | None = None, rngs: nnx.Rngs):
        w0, w1 = widths
        self.convs = _chain(lambda a, b: _conv3(a, b, dtype, rngs), (in_channels, w0, w0, w1, w1))
        self.out = nnx.Linear(w1, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = as_images(x)
        c0, c1, c2, c3 = self.convs
        x = jax.nn.relu(c0(x))
        x = max_pool_2x2(jax.nn.relu(c1(x)))
        x = max_pool_2x2(jax.nn.relu(c2(x)))
        x = jax.nn.relu(c3(x))
        return float32_logits(self.out(global_avg_pool(x)))


class SmallConvNet(nnx.Module):
    """The benchmark student, as `mtkd_jax.models.zoo.linen.SmallConvNet`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.nnx import SmallConvNet
      >>> SmallConvNet(1, 10, rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8))).shape
      (2, 10)
    """

    def __init__(self, in_channels: int, num_classes: int, *, widths: Sequence[int] = (32, 64),
                 dtype: Dtype | None = None, rngs: nnx.Rngs):
        w0, w1 = widths
        self.conv0 = _conv3(in_channels, w0, dtype, rngs)
        self.conv1 = _conv3(w0, w1, dtype, rngs)
        self.out = nnx.Linear(w1, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = as_images(x)
        x = max_pool_2x2(jax.nn.relu(self.conv0(x)))
        x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
        return float32_logits(self.out(global_avg_pool(x)))


class _BasicBlock(nnx.Module):
    """conv3x3-GroupNorm-ReLU-conv3x3-GroupNorm plus a shortcut, then ReLU (as in Linen)."""

    def __init__(self, in_width: int, width: int, stride: int, norm: str | None,
                 num_groups: int, dtype, rngs: nnx.Rngs):
        s = (stride, stride)
        grouped = norm == "group"
        zeros = nnx.initializers.zeros
        self.conv0 = _conv3(in_width, width, dtype, rngs, strides=s, use_bias=not grouped)
        self.conv1 = _conv3(width, width, dtype, rngs, use_bias=not grouped,
                            **({} if grouped else {"kernel_init": zeros}))
        self.norm0 = nnx.GroupNorm(width, num_groups, dtype=dtype, rngs=rngs) if grouped else None
        self.norm1 = (
            nnx.GroupNorm(width, num_groups, dtype=dtype, scale_init=zeros, rngs=rngs)
            if grouped else None
        )
        project = stride != 1 or in_width != width
        self.proj = (
            nnx.Conv(in_width, width, (1, 1), strides=s, use_bias=False, dtype=dtype, rngs=rngs)
            if project else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv0(x)
        y = jax.nn.relu(y if self.norm0 is None else self.norm0(y))
        y = self.conv1(y)
        y = y if self.norm1 is None else self.norm1(y)
        if self.proj is not None:
            x = self.proj(x)
        return jax.nn.relu(x + y)


class ResNet(nnx.Module):
    """A basic-block ResNet without batch norm, as `mtkd_jax.models.zoo.linen.ResNet`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.zoo.nnx import ResNet
      >>> net = ResNet(3, 10, widths=(8, 16), blocks=(1, 1), num_groups=4, rngs=nnx.Rngs(0))
      >>> net(jnp.zeros((2, 16, 16, 3))).shape
      (2, 10)
    """

    def __init__(self, in_channels: int, num_classes: int, *,
                 widths: Sequence[int] = (64, 128, 256), blocks: Sequence[int] = (2, 2, 2),
                 norm: str | None = "group", num_groups: int = 8, dtype: Dtype | None = None,
                 rngs: nnx.Rngs):
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"`widths` and `blocks` must be non-empty and of the same length, got "
                f"widths={tuple(widths)} and blocks={tuple(blocks)}."
            )
        if norm not in ("group", None):
            raise ValueError(f"`norm` must be 'group' or None, got {norm!r}.")
        if norm == "group" and any(w % num_groups for w in widths):
            raise ValueError(
                f"`num_groups`={num_groups} must divide every width in `widths`={tuple(widths)}."
            )
        grouped = norm == "group"
        self.stem = _conv3(in_channels, widths[0], dtype, rngs, use_bias=not grouped)
        self.stem_norm = (
            nnx.GroupNorm(widths[0], num_groups, dtype=dtype, rngs=rngs) if grouped else None
        )
        layers, width = [], widths[0]
        for stage, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(_BasicBlock(width, w, stride, norm, num_groups, dtype, rngs))
                width = w
        self.blocks = nnx.List(layers)
        self.out = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem(as_images(x))
        x = jax.nn.relu(x if self.stem_norm is None else self.stem_norm(x))
        for block in self.blocks:
            x = block(x)
        return float32_logits(self.out(global_avg_pool(x)))
