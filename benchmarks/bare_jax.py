"""The benchmark's distillation step written by hand in JAX and optax, without mtkd_jax.

This is the practical limit for a JAX library: what a user would write for this one workload
with no abstraction at all. The models read the same parameter pytrees as the Flax models of
`mtkd_jax.models` (`Conv_0/kernel` HWIO, `Dense_0/kernel` ...), so the bare and the library
steps can be checked to compute the same loss on the same weights (see `run.py --check`).

Nothing here imports mtkd_jax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, p, dtype, *, stride: int = 1):
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        p["kernel"].astype(dtype),
        (stride, stride),
        "SAME",
        dimension_numbers=_DIMS,
    )
    return y + p["bias"].astype(dtype) if "bias" in p else y


def _dense(x, p, dtype):
    return x.astype(dtype) @ p["kernel"].astype(dtype) + p["bias"].astype(dtype)


def _pool(x):
    b, h, w, c = x.shape
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def convnet(params, x, dtype=jnp.float32):
    """The teacher: conv64-conv64-pool-conv128-pool-conv128-GAP-dense, logits float32."""
    x = jax.nn.relu(_conv(x, params["Conv_0"], dtype))
    x = _pool(jax.nn.relu(_conv(x, params["Conv_1"], dtype)))
    x = _pool(jax.nn.relu(_conv(x, params["Conv_2"], dtype)))
    x = jax.nn.relu(_conv(x, params["Conv_3"], dtype))
    return _dense(jnp.mean(x, axis=(1, 2)), params["Dense_0"], dtype).astype(jnp.float32)


def small_convnet(params, x, dtype=jnp.float32):
    """The student: conv32-pool-conv64-pool-GAP-dense, logits float32."""
    x = _pool(jax.nn.relu(_conv(x, params["Conv_0"], dtype)))
    x = _pool(jax.nn.relu(_conv(x, params["Conv_1"], dtype)))
    return _dense(jnp.mean(x, axis=(1, 2)), params["Dense_0"], dtype).astype(jnp.float32)


def _group_norm(x, p, groups: int, dtype, eps: float = 1e-6):
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g), axis=(1, 2, 4), keepdims=True) - jnp.square(mean)
    g = (g - mean) * jax.lax.rsqrt(var + eps)
    y = g.reshape(b, h, w, c) * p["scale"] + p["bias"]
    return y.astype(dtype)


def make_resnet(widths: Sequence[int], blocks: Sequence[int], *, groups: int = 8) -> Callable:
    """A basic-block ResNet with GroupNorm, reading `mtkd_jax.models.ResNet`'s param layout."""

    def apply(params, x, dtype=jnp.float32):
        x = jax.nn.relu(
            _group_norm(_conv(x, params["Conv_0"], dtype), params["GroupNorm_0"], groups, dtype)
        )
        i = 0
        for stage, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                p = params[f"_BasicBlock_{i}"]
                stride = 2 if stage > 0 and j == 0 else 1
                y = jax.nn.relu(
                    _group_norm(
                        _conv(x, p["Conv_0"], dtype, stride=stride), p["GroupNorm_0"], groups, dtype
                    )
                )
                y = _group_norm(_conv(y, p["Conv_1"], dtype), p["GroupNorm_1"], groups, dtype)
                if stride != 1 or x.shape[-1] != width:
                    x = _conv(x, p["Conv_2"], dtype, stride=stride)
                x = jax.nn.relu(x + y)
                i += 1
        return _dense(jnp.mean(x, axis=(1, 2)), params["Dense_0"], dtype).astype(jnp.float32)

    return apply


def make_step(
    teacher_fn: Callable,
    student_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    temperature: float,
    alpha: float,
    dtype=jnp.float32,
) -> Callable:
    """`step(params, opt_state, teacher_params_list, x, y) -> (params, opt_state, metrics)`.

    Teachers run one after another (a Python loop, as one would write it); then softmax at T,
    the pairwise squared-difference matrix, CA-MKD confidence weights, the fused target and
    `(1 - alpha) T^2 KL + alpha CE`, an optax update of the student only.
    """
    t = temperature

    def step(params, opt_state, teacher_params, x, y):
        z = jnp.stack([teacher_fn(tp, x, dtype) for tp in teacher_params])  # [K, B, C]
        z = jax.lax.stop_gradient(z)
        k = z.shape[0]
        probs = jax.nn.softmax(z / t, axis=-1)
        diff = probs[:, None] - probs[None, :]  # [K, K, B, C]
        divergence = jnp.mean(jnp.sum(jnp.square(diff), axis=-1), axis=-1)  # [K, K]
        ce_teacher = -jnp.take_along_axis(
            jax.nn.log_softmax(z, axis=-1), y[None, :, None], axis=-1
        )[..., 0]  # [K, B]
        w = (1.0 - jax.nn.softmax(ce_teacher, axis=0)) / (k - 1)
        target = jnp.sum(w[..., None] * probs, axis=0)  # [B, C]

        def loss_fn(p):
            s = student_fn(p, x, dtype)
            log_q = jax.nn.log_softmax(s / t, axis=-1)
            log_t = jnp.log(jnp.where(target > 0, target, 1.0))
            kl = jnp.sum(jnp.where(target > 0, target * (log_t - log_q), 0.0), axis=-1)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), y[:, None], axis=-1)[:, 0]
            return jnp.mean((1.0 - alpha) * t * t * kl + alpha * ce), s

        (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "teacher_weights": jnp.mean(w, axis=1),
            "teacher_divergence": divergence,
            "accuracy": jnp.mean(jnp.argmax(s, -1) == y),
        }
        return params, opt_state, metrics

    return step
