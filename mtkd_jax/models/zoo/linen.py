"""The reference models in Flax Linen: MLP, CNN1D, ConvNet, SmallConvNet, ResNet.

Small and XLA-friendly: SAME-padded 3x3 convolutions, ReLU, 2x2 max pooling written as
reshape-and-max (`layers.max_pool_2x2`), global average pooling as a mean, no batch norm by
default (so an apply function is pure, with no mutable state). `MLP` and `CNN1D` take
`dropout=` and `batch_norm=True` (then `__call__(x, train)`; train them as a
`mtkd_jax.models.linen_model`). Every model returns float32 logits `[B, C]` whatever its
compute `dtype`. The same models in Flax NNX: `mtkd_jax.models.zoo.nnx`.

* `MLP`: dense layers over the flattened input.
* `CNN1D`: a 1-D CNN for MNIST-1D inputs `[B, 40]`.
* `ConvNet`: the benchmark teacher (issue 6) for images `[B, H, W, C]`.
* `SmallConvNet`: the benchmark student.
* `ResNet`: a basic-block ResNet with configurable widths and blocks, GroupNorm or no norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from mtkd_jax.models.zoo.layers import (
    Dtype,
    as_images,
    float32_logits,
    global_avg_pool,
    max_pool_2x2,
)

__all__ = ["CNN1D", "MLP", "ConvNet", "ResNet", "SmallConvNet"]


class MLP(nn.Module):
    """Dense-ReLU layers over the flattened input, then a linear classifier.

    Attributes:
      num_classes: C, the number of logits.
      features: hidden layer widths.
      dtype: compute dtype (params stay float32); None infers it from the inputs.
      dropout: dropout rate after each hidden layer (0: none).
      batch_norm: BatchNorm after each hidden dense layer (before the ReLU).

    Input `[B, ...]` (flattened), output float32 logits `[B, C]`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import MLP, init_params, apply_fn_of, count_params
      >>> model = MLP(num_classes=3, features=(8,))
      >>> params = init_params(model, jax.random.key(0), jnp.zeros((1, 4)))
      >>> count_params(params)  # (4*8 + 8) + (8*3 + 3)
      67
      >>> apply_fn_of(model)(params, jnp.zeros((5, 4))).shape
      (5, 3)
    """

    num_classes: int
    features: Sequence[int] = (128, 128)
    dtype: Dtype | None = None
    dropout: float = 0.0
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.features:
            x = nn.Dense(width, dtype=self.dtype)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
            x = nn.relu(x)
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype)(x))


class CNN1D(nn.Module):
    """A 1-D CNN for MNIST-1D: conv5-ReLU, then conv-ReLU-maxpool2 stages, flatten, dense.

    Flattening (not average pooling) keeps where along the signal a feature fired, which
    MNIST-1D's digits need (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D").

    Attributes:
      num_classes: C.
      features: channels of the convolutions; the first is not followed by pooling.
      kernel_size: width of the convolution kernels.
      hidden: width of a dense layer before the classifier (0 for none).
      dtype: compute dtype; None infers it.
      dropout: dropout rate after the hidden dense layer (0: none).
      batch_norm: BatchNorm after each convolution (before the ReLU).

    Input `[B, L]` (a channel axis is added) or `[B, L, F]`; output float32 logits `[B, C]`.

    Example:
      >>> from functools import partial
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import CNN1D, init_params, apply_fn_of
      >>> model = CNN1D(num_classes=10)
      >>> params = jax.eval_shape(partial(init_params, model), jax.random.key(0),
      ...                         jnp.zeros((1, 40)))
      >>> jax.eval_shape(apply_fn_of(model), params, jnp.zeros((2, 40))).shape
      (2, 10)
    """

    num_classes: int
    features: Sequence[int] = (32, 32, 64)
    kernel_size: int = 5
    hidden: int = 128
    dtype: Dtype | None = None
    dropout: float = 0.0
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"`x` must be [B, L] or [B, L, F], got shape {x.shape}.")
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (self.kernel_size,), dtype=self.dtype)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
            x = nn.relu(x)
            if i > 0:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        if self.hidden:
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype)(x))


class ConvNet(nn.Module):
    """The benchmark teacher (issue 6), SAME padding throughout.

    conv3x3(w0)-ReLU-conv3x3(w0)-ReLU-maxpool2-conv3x3(w1)-ReLU-maxpool2-conv3x3(w1)-ReLU-
    global average pool-dense(C), with `widths=(w0, w1) = (64, 128)` by default.

    Attributes:
      num_classes: C.
      widths: channels of the first two and of the last two convolutions.
      dtype: compute dtype; None infers it.

    Input `[B, H, W, C_in]` or `[B, H, W]`; output float32 logits `[B, C]`.

    Example:
      >>> from functools import partial
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import ConvNet, init_params, apply_fn_of
      >>> model = ConvNet(num_classes=100)
      >>> x = jnp.zeros((256, 32, 32, 3))
      >>> params = jax.eval_shape(partial(init_params, model), jax.random.key(0), x)
      >>> jax.eval_shape(apply_fn_of(model), params, x).shape
      (256, 100)
    """

    num_classes: int
    widths: Sequence[int] = (64, 128)
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w0, w1 = self.widths
        x = as_images(x)
        conv = lambda w: nn.Conv(w, (3, 3), padding="SAME", dtype=self.dtype)
        x = nn.relu(conv(w0)(x))
        x = max_pool_2x2(nn.relu(conv(w0)(x)))
        x = max_pool_2x2(nn.relu(conv(w1)(x)))
        x = nn.relu(conv(w1)(x))
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype)(global_avg_pool(x)))


class SmallConvNet(nn.Module):
    """The benchmark student (issue 6), SAME padding.

    conv3x3(w0)-ReLU-maxpool2-conv3x3(w1)-ReLU-maxpool2-global average pool-dense(C), with
    `widths=(w0, w1) = (32, 64)` by default.

    Attributes:
      num_classes: C.
      widths: channels of the two convolutions.
      dtype: compute dtype; None infers it.
      flatten: flatten the last feature map instead of averaging it, so the classifier
        knows where a feature fired (digits, characters; the image-folder teacher): the
        dense layer then has `H/4 * W/4 * w1 * C` weights.

    Input `[B, H, W, C_in]` or `[B, H, W]`; output float32 logits `[B, C]`.

    Example:
      >>> from functools import partial
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import SmallConvNet, init_params, count_params
      >>> params = jax.eval_shape(partial(init_params, SmallConvNet(num_classes=10)),
      ...                         jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> count_params(params)  # (9*1*32 + 32) + (9*32*64 + 64) + (64*10 + 10)
      19466
    """

    num_classes: int
    widths: Sequence[int] = (32, 64)
    dtype: Dtype | None = None
    flatten: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w0, w1 = self.widths
        x = as_images(x)
        x = max_pool_2x2(nn.relu(nn.Conv(w0, (3, 3), padding="SAME", dtype=self.dtype)(x)))
        x = max_pool_2x2(nn.relu(nn.Conv(w1, (3, 3), padding="SAME", dtype=self.dtype)(x)))
        x = x.reshape(x.shape[0], -1) if self.flatten else global_avg_pool(x)
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype)(x))


class _BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm plus a shortcut, then ReLU."""

    width: int
    stride: int
    norm: str | None
    num_groups: int
    dtype: Dtype | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.stride, self.stride)
        y = nn.Conv(
            self.width,
            (3, 3),
            strides=s,
            padding="SAME",
            use_bias=self.norm is None,
            dtype=self.dtype,
        )(x)
        if self.norm == "group":
            y = nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(y)
        y = nn.relu(y)
        # The residual branch starts at zero (last norm's scale, or the last conv's kernel
        # without a norm), so at init each block is the identity and a deep net without batch
        # norm still trains (Goyal et al. 2017; De & Smith 2020, SkipInit).
        if self.norm == "group":
            y = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(y)
            y = nn.GroupNorm(
                num_groups=self.num_groups, scale_init=nn.initializers.zeros, dtype=self.dtype
            )(y)
        else:
            y = nn.Conv(
                self.width,
                (3, 3),
                padding="SAME",
                kernel_init=nn.initializers.zeros,
                dtype=self.dtype,
            )(y)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = nn.Conv(self.width, (1, 1), strides=s, use_bias=False, dtype=self.dtype)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A basic-block ResNet for GPU-sized benchmarks, without batch norm.

    Stem conv3x3(widths[0]), then for each stage i `blocks[i]` basic blocks of `widths[i]`
    channels (the first block of every stage after the first has stride 2), global average
    pool, dense(C). `widths=(64, 128, 256), blocks=(2, 2, 2)` is a ResNet-14-like CIFAR net.

    Attributes:
      num_classes: C.
      widths: channels per stage.
      blocks: basic blocks per stage (same length as `widths`).
      norm: "group" (GroupNorm with `num_groups` groups) or None (no normalisation; residual
        branches are zero-initialised instead).
      num_groups: groups of GroupNorm; must divide every width.
      dtype: compute dtype; None infers it.

    Input `[B, H, W, C_in]` or `[B, H, W]`; output float32 logits `[B, C]`.

    Example:
      >>> from functools import partial
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import ResNet, init_params, apply_fn_of
      >>> model = ResNet(num_classes=10, widths=(8, 16), blocks=(1, 1), num_groups=4)
      >>> x = jnp.zeros((2, 16, 16, 3))
      >>> params = jax.eval_shape(partial(init_params, model), jax.random.key(0), x)
      >>> jax.eval_shape(apply_fn_of(model), params, x).shape
      (2, 10)
    """

    num_classes: int
    widths: Sequence[int] = (64, 128, 256)
    blocks: Sequence[int] = (2, 2, 2)
    norm: str | None = "group"
    num_groups: int = 8
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"`widths` and `blocks` must be non-empty and of the same length, got "
                f"widths={tuple(self.widths)} and blocks={tuple(self.blocks)}."
            )
        if self.norm not in ("group", None):
            raise ValueError(f"`norm` must be 'group' or None, got {self.norm!r}.")
        if self.norm == "group" and any(w % self.num_groups for w in self.widths):
            raise ValueError(
                f"`num_groups`={self.num_groups} must divide every width in "
                f"`widths`={tuple(self.widths)}."
            )
        x = as_images(x)
        x = nn.Conv(
            self.widths[0], (3, 3), padding="SAME", use_bias=self.norm is None, dtype=self.dtype
        )(x)
        if self.norm == "group":
            x = nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(x)
        x = nn.relu(x)
        for stage, (width, n) in enumerate(zip(self.widths, self.blocks, strict=True)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                x = _BasicBlock(width, stride, self.norm, self.num_groups, self.dtype)(x)
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype)(global_avg_pool(x)))
