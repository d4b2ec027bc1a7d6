"""Reference models (Flax Linen) and helpers that turn any model into `apply_fn(params, x)`.

The models are small and XLA-friendly: SAME-padded 3x3 convolutions, ReLU, 2x2 max pooling
written as reshape-and-max (`max_pool_2x2`), global average pooling as a mean, no batch norm
(so an apply function is pure, with no mutable state). Every model returns float32 logits
`[B, C]` whatever its compute `dtype`.

* `MLP`: dense layers over the flattened input.
* `CNN1D`: a 1-D CNN for MNIST-1D inputs `[B, 40]`.
* `ConvNet`: the benchmark teacher (issue 6) for images `[B, H, W, C]`.
* `SmallConvNet`: the benchmark student.
* `ResNet`: a basic-block ResNet with configurable widths and blocks, GroupNorm or no norm.

The rest of the library sees a model only as `apply_fn(params, x) -> logits [B, C]`:
`apply_fn_of` gives one for a Linen module, `nnx_apply_fn` for a Flax NNX module split with
`nnx.split`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

Dtype = Any


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Max pooling with window 2 and stride 2 on every spatial axis, by reshape and max.

    Equal to `flax.linen.max_pool(x, (2,) * s, strides=(2,) * s)` (VALID padding: an odd
    trailing row/column is dropped), forward and gradient wherever the maxima are unique. It
    lowers to a reshape and a reduce instead of `reduce_window`, whose gradient
    (`select_and_scatter`) took ~37% of a small CNN's train step on a CPU; this form ran
    1.44x faster there. At ties the gradient is shared equally among the tied entries
    (`reduce_window`'s gradient picks one); after a ReLU such ties are zeros whose ReLU
    gradient is 0 anyway.

    Args:
      x: `[B, *spatial, F]` with one or two spatial axes, e.g. `[B, H, W, F]` or `[B, L, F]`.

    Returns:
      `[B, *(s // 2 for s in spatial), F]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import max_pool_2x2
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> max_pool_2x2(x)[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    if x.ndim not in (3, 4):
        raise ValueError(
            f"`x` must be [B, L, F] or [B, H, W, F] (one or two spatial axes), got shape {x.shape}."
        )
    spatial = x.shape[1:-1]
    if any(s < 2 for s in spatial):
        raise ValueError(f"`x` needs spatial sizes >= 2 to pool by 2, got shape {x.shape}.")
    even = tuple(s - s % 2 for s in spatial)
    x = x[(slice(None), *(slice(0, e) for e in even))]
    b, f = x.shape[0], x.shape[-1]
    split = [d for e in even for d in (e // 2, 2)]
    x = x.reshape(b, *split, f)
    window_axes = tuple(2 + 2 * i for i in range(len(spatial)))
    return jnp.max(x, axis=window_axes)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: `[B, *spatial, F] -> [B, F]`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import global_avg_pool
      >>> global_avg_pool(jnp.ones((2, 3, 3, 4))).shape
      (2, 4)
    """
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def _as_images(x: jax.Array) -> jax.Array:
    """`[B, H, W]` (grayscale without a channel axis) or `[B, H, W, C]` -> `[B, H, W, C]`."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"`x` must be images [B, H, W, C] or [B, H, W], got shape {x.shape}.")
    return x


def _logits(x: jax.Array) -> jax.Array:
    # Losses take log_softmax of the logits: keep that in float32 even for bfloat16 models.
    return x.astype(jnp.float32)


class MLP(nn.Module):
    """Dense-ReLU layers over the flattened input, then a linear classifier.

    Attributes:
      num_classes: C, the number of logits.
      features: hidden layer widths.
      dtype: compute dtype (params stay float32); None infers it from the inputs.

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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.features:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype)(x))


class CNN1D(nn.Module):
    """A 1-D CNN for MNIST-1D: conv5-ReLU, then conv-ReLU-maxpool2 stages, flatten, dense.

    Flattening (not average pooling) keeps where along the signal a feature fired, which
    MNIST-1D's digits need; the MNIST-1D paper reports ~94% test accuracy for a 3-layer CNN.

    Attributes:
      num_classes: C.
      features: channels of the convolutions; the first is not followed by pooling.
      kernel_size: width of the convolution kernels.
      hidden: width of a dense layer before the classifier (0 for none).
      dtype: compute dtype; None infers it.

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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"`x` must be [B, L] or [B, L, F], got shape {x.shape}.")
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Conv(width, (self.kernel_size,), dtype=self.dtype)(x))
            if i > 0:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        if self.hidden:
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype)(x))


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
        x = _as_images(x)
        conv = lambda w: nn.Conv(w, (3, 3), padding="SAME", dtype=self.dtype)
        x = nn.relu(conv(w0)(x))
        x = max_pool_2x2(nn.relu(conv(w0)(x)))
        x = max_pool_2x2(nn.relu(conv(w1)(x)))
        x = nn.relu(conv(w1)(x))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype)(global_avg_pool(x)))


class SmallConvNet(nn.Module):
    """The benchmark student (issue 6), SAME padding.

    conv3x3(w0)-ReLU-maxpool2-conv3x3(w1)-ReLU-maxpool2-global average pool-dense(C), with
    `widths=(w0, w1) = (32, 64)` by default.

    Attributes:
      num_classes: C.
      widths: channels of the two convolutions.
      dtype: compute dtype; None infers it.

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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w0, w1 = self.widths
        x = _as_images(x)
        x = max_pool_2x2(nn.relu(nn.Conv(w0, (3, 3), padding="SAME", dtype=self.dtype)(x)))
        x = max_pool_2x2(nn.relu(nn.Conv(w1, (3, 3), padding="SAME", dtype=self.dtype)(x)))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype)(global_avg_pool(x)))


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
        x = _as_images(x)
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
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype)(global_avg_pool(x)))


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
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
    return MODELS[name](num_classes=int(num_classes), **kwargs)


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array) -> Any:
    """Initialise a Linen model's parameters from an example batch.

    Args:
      model: a Linen module whose only variable collection is "params" (no batch stats).
      key: PRNG key. On a CPU, compiling the default threefry generator dominates init time;
        a `jax.random.key(seed, impl="rbg")` key compiles several times faster (its values
        differ from threefry's, and under `jax.vmap` from unbatched calls).
      example_x: `[B, ...]` example input; only its shape and dtype matter.

    Returns:
      The params pytree (the "params" collection).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import MLP, init_params
      >>> sorted(init_params(MLP(num_classes=2, features=(3,)), jax.random.key(0),
      ...                    jnp.zeros((1, 5))))
      ['Dense_0', 'Dense_1']
    """
    # One compiled program: eager init compiles the random-bit generator once per kernel
    # shape, seconds each on a CPU.
    variables = jax.jit(model.init)(key, example_x)
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise ValueError(
            f"`model` has variable collections {extra} besides 'params'; `apply_fn_of` "
            "supports stateless models only (params in, logits out)."
        )
    return variables["params"]


def apply_fn_of(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """The plain `apply_fn(params, x) -> logits [B, C]` of a Linen model.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import MLP, init_params, apply_fn_of
      >>> model = MLP(num_classes=2, features=(3,))
      >>> params = init_params(model, jax.random.key(0), jnp.zeros((1, 5)))
      >>> jax.jit(apply_fn_of(model))(params, jnp.ones((4, 5))).shape
      (4, 2)
    """

    def apply_fn(params: Any, x: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x)

    return apply_fn


def nnx_apply_fn(graphdef: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """The plain `apply_fn(state, x) -> logits` of a Flax NNX module split by `nnx.split`.

    `graphdef, state = nnx.split(module)`; the state is the params pytree the rest of the
    library differentiates, stacks and checkpoints. Each call rebuilds the module with
    `nnx.merge` (free under `jax.jit`). For deterministic modules: any state the call mutates
    (e.g. RNG counters of dropout) is not returned.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models import nnx_apply_fn
      >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> jax.jit(nnx_apply_fn(graphdef))(state, jnp.ones((2, 4))).shape
      (2, 3)
    """
    from flax import nnx

    def apply_fn(state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)

    return apply_fn


def count_params(params: Any) -> int:
    """Total number of scalars in a params pytree.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models import count_params
      >>> count_params({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
      16
    """
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(params)))


def flops_per_example(
    apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, example_x: jax.Array
) -> float:
    """Forward FLOPs per example, from XLA's cost analysis of the compiled `apply_fn`.

    The count is XLA's for this backend (a multiply-add counts 2): a measure of the work,
    not a timing.

    Args:
      apply_fn: `(params, x) -> logits`.
      params: its params (arrays or `jax.ShapeDtypeStruct`s).
      example_x: `[B, ...]` input batch (or a `jax.ShapeDtypeStruct`); the total is divided
        by B.

    Returns:
      FLOPs per example, a Python float.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtkd_jax.models import flops_per_example
      >>> flops_per_example(lambda w, x: x @ w, jnp.zeros((8, 4)), jnp.zeros((16, 8)))
      64.0
    """
    if not jnp.ndim(example_x) or example_x.shape[0] < 1:
        raise ValueError(
            f"`example_x` must be a batch [B, ...] with B >= 1, got shape {jnp.shape(example_x)}."
        )
    cost = jax.jit(apply_fn).lower(params, example_x).compile().cost_analysis()
    # jax 0.10 returns a dict; older versions a list with one dict per computation.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise RuntimeError(
            f"XLA's cost analysis gave no FLOP count on backend {jax.default_backend()!r}."
        )
    return float(cost["flops"]) / example_x.shape[0]
