"""Reference models: shapes, pooling equivalence, parameter counts, FLOPs, NNX as apply_fn."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtkd_jax import models
from mtkd_jax.models import (
    CNN1D,
    MLP,
    ConvNet,
    ResNet,
    SmallConvNet,
    apply_fn_of,
    count_params,
    flops_per_example,
    init_params,
    make_model,
    max_pool_2x2,
    nnx_apply_fn,
)


def _key(seed):
    # rbg keys compile several times faster than threefry on a CPU (see `init_params`).
    return jax.random.key(seed, impl="rbg")


def _abstract_params(model, x):
    """Params as ShapeDtypeStructs: enough for counts and FLOPs, nothing compiled."""
    return jax.eval_shape(functools.partial(init_params, model), _key(0), x)


@pytest.mark.parametrize(
    "model, x_shape",
    [
        (MLP(num_classes=5, features=(16, 8)), (3, 4, 5)),
        (CNN1D(num_classes=10, features=(4, 4, 8), hidden=16), (3, 40)),
        (ConvNet(num_classes=7, widths=(4, 8)), (3, 12, 12, 3)),
        (SmallConvNet(num_classes=7, widths=(4, 8)), (3, 12, 12)),
        (ResNet(num_classes=6, widths=(8, 16), blocks=(1, 1), num_groups=4), (3, 8, 8, 3)),
        (ResNet(num_classes=6, widths=(4, 8), blocks=(1, 2), norm=None), (3, 8, 8, 1)),
    ],
    ids=["mlp", "cnn1d", "convnet", "small_convnet_gray", "resnet_gn", "resnet_nonorm"],
)
def test_shapes_and_float32_logits(model, x_shape, rng):
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    params = init_params(model, _key(0), x[:1])
    logits = jax.jit(apply_fn_of(model))(params, x)
    assert logits.shape == (x_shape[0], model.num_classes)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_bfloat16_compute_keeps_float32_params_and_logits(rng):
    model = SmallConvNet(num_classes=4, widths=(4, 8), dtype=jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    params = init_params(model, _key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    logits = apply_fn_of(model)(params, x)
    assert logits.dtype == jnp.float32
    ref = apply_fn_of(model.clone(dtype=jnp.float32))(params, x)
    np.testing.assert_allclose(logits, ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 5, 2), (3, 9, 4), (3, 10, 1)])
def test_max_pool_2x2_matches_flax_max_pool(shape, rng):
    # Continuous random inputs: maxima are unique, so gradients must agree too.
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    window = (2,) * (len(shape) - 2)
    ref_fn = lambda x: nn.max_pool(x, window, strides=window)
    np.testing.assert_array_equal(max_pool_2x2(x), ref_fn(x))
    cot = jnp.asarray(rng.normal(size=ref_fn(x).shape), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(cot * max_pool_2x2(x)))(x)
    ref_grad = jax.grad(lambda x: jnp.sum(cot * ref_fn(x)))(x)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=0)


def test_max_pool_2x2_after_relu_same_gradient_despite_ties(rng):
    # ReLU makes many all-zero windows (ties), where the two poolings route the gradient
    # differently; the ReLU's zero derivative there makes the composite gradients equal.
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)) - 1.0, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    ref = lambda x: nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2))
    g = jax.grad(lambda x: jnp.sum(cot * max_pool_2x2(jax.nn.relu(x))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(cot * ref(x)))(x)
    np.testing.assert_array_equal(g, g_ref)


def test_max_pool_2x2_bad_rank():
    with pytest.raises(ValueError, match=r"\[B, L, F\] or \[B, H, W, F\]"):
        max_pool_2x2(jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="spatial sizes >= 2"):
        max_pool_2x2(jnp.zeros((2, 1, 4, 3)))


def test_mlp_matches_numpy_reference_and_hand_param_count(rng):
    model = MLP(num_classes=3, features=(7, 5))
    x = rng.normal(size=(4, 11))
    params = init_params(model, _key(1), jnp.zeros((1, 11)))
    assert count_params(params) == (11 * 7 + 7) + (7 * 5 + 5) + (5 * 3 + 3)
    h = np.asarray(x, np.float64)
    for i in range(3):
        layer = params[f"Dense_{i}"]
        h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < 2:
            h = np.maximum(h, 0.0)
    got = apply_fn_of(model)(params, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)


def test_convnet_param_count_by_hand():
    params = _abstract_params(ConvNet(num_classes=10, widths=(4, 8)), jnp.zeros((1, 8, 8, 3)))
    conv = lambda cin, cout: 9 * cin * cout + cout
    assert count_params(params) == conv(3, 4) + conv(4, 4) + conv(4, 8) + conv(8, 8) + 8 * 10 + 10


def test_flops_positive_and_scale_with_width():
    x = jnp.zeros((8, 64))

    def mlp_flops(width):
        model = MLP(num_classes=10, features=(width,))
        return flops_per_example(apply_fn_of(model), _abstract_params(model, x), x)

    f64, f128 = mlp_flops(64), mlp_flops(128)
    # A one-hidden-layer MLP does ~2 * (64 * h + h * 10) FLOPs: linear in the width h.
    assert 2 * (64 * 64 + 64 * 10) <= f64 < 1.2 * 2 * (64 * 64 + 64 * 10)
    assert 1.9 < f128 / f64 < 2.1

    img = jnp.zeros((2, 8, 8, 3))

    def conv_flops(widths):
        model = SmallConvNet(num_classes=10, widths=widths)
        return flops_per_example(apply_fn_of(model), _abstract_params(model, img), img)

    small, big = conv_flops((4, 8)), conv_flops((8, 16))
    assert 0 < small < big


def test_flops_needs_a_batch():
    with pytest.raises(ValueError, match="example_x"):
        flops_per_example(lambda w, x: x * w, jnp.ones(()), jnp.ones(()))


def test_registry_and_errors():
    assert isinstance(make_model("convnet", num_classes=5), ConvNet)
    assert make_model("resnet", num_classes=3, widths=(8,), blocks=(1,)).blocks == (1,)
    assert set(models.MODELS) == {"mlp", "cnn1d", "convnet", "small_convnet", "resnet"}
    with pytest.raises(ValueError, match=r"`name` must be one of \['cnn1d'"):
        make_model("vgg16", num_classes=3)
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1"):
        make_model("mlp", num_classes=0)


def test_resnet_bad_config():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="`num_groups`=8 must divide"):
        _abstract_params(ResNet(num_classes=2, widths=(12,), blocks=(1,)), x)
    with pytest.raises(ValueError, match="same length"):
        _abstract_params(ResNet(num_classes=2, widths=(8, 16), blocks=(1,)), x)


def test_resnet_without_norm_starts_as_identity_blocks(rng):
    # Zero-initialised residual branches: the blocks add nothing at init, so the network
    # equals stem -> 1x1 projection shortcuts -> head.
    model = ResNet(num_classes=3, widths=(4, 4), blocks=(2, 1), norm=None)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    params = init_params(model, _key(0), x)
    stem = params["Conv_0"]
    h = jax.nn.relu(nn.Conv(4, (3, 3)).apply({"params": stem}, x))
    # Stage 0 keeps the width (identity shortcuts, ReLU of a non-negative input is itself);
    # stage 1 downsamples with a strided 1x1 conv.
    proj = params["_BasicBlock_2"]["Conv_2"]
    h = jax.nn.relu(nn.Conv(4, (1, 1), strides=(2, 2), use_bias=False).apply({"params": proj}, h))
    ref = nn.Dense(3).apply({"params": params["Dense_0"]}, jnp.mean(h, axis=(1, 2)))
    np.testing.assert_allclose(apply_fn_of(model)(params, x), ref, rtol=1e-5, atol=1e-6)


def test_init_params_rejects_stateful_models():
    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True)(x)

    with pytest.raises(ValueError, match=r"variable collections \['batch_stats'\]"):
        init_params(WithBatchNorm(), _key(0), jnp.zeros((1, 3)))


class _NNXMLP(nnx.Module):
    def __init__(self, din, dhidden, dout, *, rngs):
        self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
        self.out = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_model_as_plain_apply_fn(rng):
    module = _NNXMLP(6, 8, 3, rngs=nnx.Rngs(_key(0)))
    graphdef, params = nnx.split(module)
    apply_fn = jax.jit(nnx_apply_fn(graphdef))
    x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=5), jnp.int32)
    np.testing.assert_allclose(apply_fn(params, x), module(x), rtol=1e-6, atol=1e-6)
    assert count_params(params) == 6 * 8 + 8 + 8 * 3 + 3

    # The functional gradient equals NNX's own, and an optax update on the state pytree
    # gives a module that NNX can run.
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
    grads = jax.grad(loss)(params)
    nnx_loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    nnx_grads = nnx.grad(nnx_loss)(module)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, nnx_grads
    )
    new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert loss(new_params) < loss(params)
    np.testing.assert_allclose(
        nnx.merge(graphdef, new_params)(x), apply_fn(new_params, x), rtol=1e-6
    )
