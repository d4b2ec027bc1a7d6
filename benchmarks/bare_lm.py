"""The language-model distillation step written by hand in JAX and optax, without mtkd_jax.

What a user would write for `benchmarks/lm.py`'s workload with no library: a Llama-style
decoder (RMSNorm, rotary embeddings, grouped-query causal attention, SiLU-gated MLP, output
head tied to the embedding) over plain dicts of arrays, the K teachers one after another, the
whole `[K, B, L, V]` soft loss at once (no chunking). The params are read in the layout of
`mtkd_jax.models.transformer.Transformer` (`nnx.to_pure_dict` of its `nnx.Param` state), so
the library's step and this one compute the same loss on the same weights.

Nothing here imports mtkd_jax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """`[D/2]` rotary inverse frequencies, `theta ** (-2i / D)` (float32)."""
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(
        np.float32)


def _rms(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, inv):
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, L, D/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def features(params: dict, tokens: jax.Array) -> jax.Array:
    """`[B, L]` int tokens -> `[B, L, E]` features after the final norm (float32)."""
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    causal = jnp.tril(jnp.ones((length, length), bool))
    h = params["embed"]["embedding"][tokens]
    for i in range(len(params["layers"])):
        p = params["layers"][i]
        a = p["attn"]
        x = _rms(h, p["attn_norm"]["scale"])
        q = jnp.einsum("ble,ehd->blhd", x, a["q"]["kernel"])
        k = jnp.einsum("ble,egd->blgd", x, a["k"]["kernel"])
        v = jnp.einsum("ble,egd->blgd", x, a["v"]["kernel"])
        heads, d = q.shape[2], q.shape[3]
        groups = heads // k.shape[2]
        inv = jnp.asarray(inv_freq(d))
        q, k = _rope(q, positions, inv), _rope(k, positions, inv)
        q = q.reshape(b, length, k.shape[2], groups, d)
        s = jnp.einsum("bqgrd,bkgd->bgrqk", q, k) * d**-0.5
        s = jnp.where(causal, s, jnp.finfo(jnp.float32).min)
        o = jnp.einsum("bgrqk,bkgd->bqgrd", jax.nn.softmax(s, axis=-1), v)
        h = h + jnp.einsum("blhd,hde->ble", o.reshape(b, length, heads, d), a["o"]["kernel"])
        m = p["mlp"]
        x = _rms(h, p["mlp_norm"]["scale"])
        h = h + (jax.nn.silu(x @ m["gate"]["kernel"]) * (x @ m["up"]["kernel"])) @ m["down"][
            "kernel"]
    return _rms(h, params["norm"]["scale"])


def logits(params: dict, tokens: jax.Array) -> jax.Array:
    """`[B, L]` tokens -> `[B, L, V]` logits (head tied to the embedding)."""
    return features(params, tokens) @ params["embed"]["embedding"].T


def make_step(tx: optax.GradientTransformation, *, temperature: float, alpha: float
              ) -> Callable:
    """`step(params, opt_state, teacher_params_list, tokens, labels, mask)
    -> (params, opt_state, metrics)`.

    Teachers one after another; the uniform mean of their softmaxes at T as the target; the
    `[K, K]` mean squared difference of their softmaxes (the library's divergence metric);
    `(1 - alpha) T^2 KL(target || student) + alpha CE`, both means over the tokens of
    `mask`; an optax update of the student only.
    """
    t = temperature

    def step(params, opt_state, teacher_params: Sequence, tokens, labels, mask):
        z = jax.lax.stop_gradient(jnp.stack([logits(tp, tokens) for tp in teacher_params]))
        probs = jax.nn.softmax(z / t, axis=-1)  # [K, B, L, V]
        target = jnp.mean(probs, axis=0)
        count = jnp.sum(mask)
        sq = jnp.sum(jnp.square(probs[:, None] - probs[None, :]), axis=-1)  # [K, K, B, L]
        divergence = jnp.sum(sq * mask, axis=(2, 3)) / count

        def loss_fn(p):
            s = logits(p, tokens)
            log_q = jax.nn.log_softmax(s / t, axis=-1)
            kl = jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-38)) - log_q), axis=-1)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), labels[..., None],
                                      axis=-1)[..., 0]
            soft = t * t * jnp.sum(kl * mask) / count
            hard = jnp.sum(ce * mask) / count
            return (1.0 - alpha) * soft + alpha * hard, s

        (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        agree = jnp.sum((jnp.argmax(s, -1) == jnp.argmax(target, -1)) * mask) / count
        return params, opt_state, {"loss": loss, "teacher_divergence": divergence,
                                   "agreement": agree}

    return step
