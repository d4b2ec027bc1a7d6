r"""The decoder-only transformer family in Flax NNX: Llama-, Qwen2/3- and Gemma(1/2/3)-style.

One model, `Transformer(config, rngs=...)`, whose options (`TransformerConfig`) express the
published families exactly (what `mtkd_jax.models` loads checkpoints onto) and the library's
own small language models (`preset`). Modules, shapes in names (B batch, L positions, V
vocabulary, E width `dim`, H query heads, G key/value heads, D `head_dim`, F `mlp_dim`):

* `RMSNorm`: `x / sqrt(mean(x^2) + eps) * (norm_offset + scale)`, in float32;
* `rope_frequencies` / `apply_rope`: rotary position embedding of `[B, L, H, D]` at explicit
  positions `[B, L]`, "rotate half" layout (dimension i pairs with i + D/2);
* `attention_mask`: the `[B, L, L]` boolean mask of causal attention over one row, with
  document boundaries (segment ids), padding and an optional sliding window;
* `Attention`: causal self-attention with grouped-query attention (G key/value heads shared
  by H / G query heads each), optional QK-norm, q/k/v biases and logit soft-capping;
* `GatedMLP`: the gated MLP `down(act(gate(x)) * up(x))`;
* `Block`: pre-norm decoder block, optionally with "sandwich" post-norms (Gemma 2/3);
* `Transformer`: embedding (optionally scaled by sqrt(E)), the blocks, a final RMSNorm, the
  output head (tied to the embedding or not) with optional final soft-capping.

**Inputs.** The model reads `x`, the batch's ``"x"``, in one of two forms:

* an int array `[B, L]` of tokens: one document per row, positions `0 .. L-1`;
* a dict ``{"tokens": [B, L], "segment_ids": [B, L], "positions": [B, L], "mask": [B, L]}``
  (every key but ``"tokens"`` optional), for packed rows and padding:
  ``"segment_ids"`` (int): a token attends only to earlier tokens of its own segment, and,
  unless ``"positions"`` is given, positions restart at 0 where the segment id changes;
  the ids must be non-decreasing along each row (over its real tokens);
  ``"positions"`` (int): explicit rotary positions, each in `[0, max_len)`;
  ``"mask"`` (1 = token, 0 = padding, the meaning of the batch's ``"mask"``): padding
  tokens are attended to by no token (needed for left padding; right padding is already
  invisible to a causal model). Padding positions' own outputs are finite and meaningless.

The same fields may be given as keywords, `model.features(tokens, segment_ids=...)`. A
dict `x` travels through the library unchanged (batches, steps, teacher runners: their
leading axis is read from any leaf), so a packed batch is ``{"x": {"tokens": ...,
"segment_ids": ...}, "y": [B, L], "mask": [B, L]}``.

**Checks.** At trace time (shapes): a row longer than `max_len` (the rotary table) is a
ValueError, as is a dict with unknown keys or mismatched shapes. On concrete inputs, in an
eager call (outside `jax.jit`): segment ids that decrease along a row (`check_segment_ids`),
positions outside `[0, max_len)`, tokens outside `[0, V)`. The segment ids of a batch's dict
`x` are also checked on the host by `mtkd_jax.training.batch.check_batch`, which the training loops
and `evaluate` call on every batch before the compiled step. Inside
`jax.jit` values cannot be read: there a position past `max_len` is not detected (its
rotation is computed from the position itself, so the output is defined, but the model was
never meant to see it) and an out-of-range token gives NaN features (`nnx.Embed`).

**Sequence-model protocol.** `features(x) -> [B, L, E]` (after the final norm) and
`head(f) -> [B, L, V]` float32 logits (soft-capped when set), `model(x)` both; so
`mtkd_jax.models.zoo.token.token_model_fns(model)` gives the plain `logits` / `features` /
`head` functions for `make_distill_step(..., student_head=...)` and the chunked loss, and
`mtkd_jax.models.nnx_split(model)` gives the `Model` (no Dropout, no model state).

**Precision.** `dtype` is the compute dtype (None: follow the params, so a
`mtkd_jax.core.precision` policy that casts the params to bfloat16 makes the model compute in
bfloat16); `param_dtype` the dtype params are created in. Norms, rotary angles, attention
logits and softmax are float32 whatever the compute dtype; logits come out float32.

**Supported options** (`TransformerConfig`): grouped-query attention (`kv_heads`), any
`head_dim`, rotary scaling ``None`` / ``{"rope_type": "linear", "factor"}`` /
``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"}``, activations ``"silu"`` (Llama, Qwen) and
``"gelu_tanh"`` (Gemma), tied or separate output head, QK-norm (Qwen3, Gemma3), q/k/v biases
(Qwen2), attention and final logit soft-capping (Gemma2), embedding scaled by sqrt(E) in the
compute dtype (Gemma), RMSNorm with `(1 + w)` (Gemma: `norm_offset=1.0`), sandwich post-norms
(Gemma2/3), a query scale other than `head_dim ** -0.5` (Gemma2/3 `query_pre_attn_scalar`),
sliding-window attention on all layers or on the layers `layer_types` names (Gemma2
alternating, Gemma3 5 local : 1 global) with its own rotary base (`local_rope_theta`,
Gemma3's `rope_local_base_freq`, no rotary scaling on local layers). Any other rotary type
(dynamic NTK, YaRN, LongRoPE), activation or layer type is a ValueError naming it. Not
modelled: Dropout, biases on the output projection or the MLP, KV caches for generation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtkd_jax.core import checks as _checks
from mtkd_jax.core.checks import check_segment_ids

__all__ = [
    "TransformerConfig",
    "PRESETS",
    "preset",
    "RMSNorm",
    "rope_frequencies",
    "apply_rope",
    "segment_positions",
    "attention_mask",
    "check_segment_ids",
    "Attention",
    "GatedMLP",
    "Block",
    "Transformer",
]

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
"""Name -> activation of the gated MLP."""

LAYER_TYPES = ("full_attention", "sliding_attention")
"""The attention of one layer: over every earlier token, or over the last `sliding_window`."""

_ROPE_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}

_INPUT_KEYS = ("tokens", "segment_ids", "positions", "mask")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a `Transformer` (see the module docstring for the families).

    Attributes:
      vocab_size: V.
      dim: E, the width of the residual stream.
      depth: number of decoder blocks.
      heads: H, query heads.
      kv_heads: G, key/value heads (grouped-query attention; H % G == 0). None: H.
      head_dim: D. None: E // H.
      mlp_dim: F, the hidden width of the gated MLP. None: 4 * E.
      max_len: the longest row (and largest position + 1) the model accepts: the length of
        its rotary table (the angles are computed from the positions on the fly).
      rope_theta: rotary base.
      rope_scaling: None, or a dict ``{"rope_type": "linear", "factor": f}`` or
        ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"}`` (stored as a sorted tuple of items).
      norm_eps: RMSNorm epsilon.
      activation: ``"silu"`` or ``"gelu_tanh"``.
      tie_embeddings: the output head is the embedding transposed.
      qk_norm: RMSNorm over D of each query and key head, before the rotary embedding.
      qkv_bias: biases on the q, k and v projections.
      attn_logit_softcap: c: attention logits `c * tanh(s / c)` (after scaling). None: off.
      final_logit_softcap: c: output logits `c * tanh(z / c)`. None: off.
      embed_scale: multiply the embedding by sqrt(E), rounded to the compute dtype.
      norm_offset: RMSNorm multiplies by `norm_offset + scale` (Gemma: 1.0, scale init 0).
      post_norms: RMSNorm on the attention and MLP outputs before each residual add.
      query_scale: attention logits are scaled by `query_scale ** -0.5`. None: `D ** -0.5`.
      sliding_window: W: a sliding layer's token attends to itself and the W - 1 tokens
        before it. None: no sliding layer.
      layer_types: one of `LAYER_TYPES` per layer. None: all ``"sliding_attention"`` when
        `sliding_window` is set, else all ``"full_attention"``.
      local_rope_theta: rotary base of sliding layers, which then use no `rope_scaling`
        (Gemma3). None: sliding layers use the global rotary embedding.
      dtype: compute dtype; None follows the params' dtype.
      param_dtype: dtype params are created in.

    Example:
      >>> from mtkd_jax.models.transformer import TransformerConfig
      >>> cfg = TransformerConfig(vocab_size=32, dim=16, depth=2, heads=4, kv_heads=2)
      >>> cfg.head_dim, cfg.mlp_dim, cfg.attention_types
      (4, 64, ('full_attention', 'full_attention'))
    """

    vocab_size: int
    dim: int
    depth: int
    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    max_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    norm_eps: float = 1e-6
    activation: str = "silu"
    tie_embeddings: bool = True
    qk_norm: bool = False
    qkv_bias: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    embed_scale: bool = False
    norm_offset: float = 0.0
    post_norms: bool = False
    query_scale: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("vocab_size", "dim", "depth", "heads", "max_len"):
            _checks.check_int(getattr(self, name), name)
        for name in ("kv_heads", "head_dim", "mlp_dim", "sliding_window"):
            _checks.check_int(getattr(self, name), name, allow_none=True)
        set_("kv_heads", self.kv_heads or self.heads)
        set_("head_dim", self.head_dim or self.dim // self.heads)
        set_("mlp_dim", self.mlp_dim or 4 * self.dim)
        if self.heads % self.kv_heads:
            raise ValueError(
                f"`heads` ({self.heads}) must be a multiple of `kv_heads` ({self.kv_heads}): "
                "each key/value head serves heads / kv_heads query heads."
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even (rotary pairs), got {self.head_dim}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}."
            )
        set_("rope_scaling", _checked_rope_scaling(self.rope_scaling))
        for name in ("rope_theta", "norm_eps", "attn_logit_softcap", "final_logit_softcap",
                     "query_scale", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0
                                          and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}.")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if len(types) != self.depth or any(t not in LAYER_TYPES for t in types):
                raise ValueError(
                    f"`layer_types` must hold {self.depth} (depth) entries from "
                    f"{LAYER_TYPES}, got {types}."
                )
            if LAYER_TYPES[1] in types and self.sliding_window is None:
                raise ValueError(
                    "`layer_types` names sliding-attention layers but `sliding_window` is None."
                )
            set_("layer_types", types)
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None:
                dtype = jnp.dtype(value)
                if not jnp.issubdtype(dtype, jnp.floating):
                    raise TypeError(f"`{name}` must be a floating dtype, got {dtype}.")
                set_(name, dtype)
        if self.param_dtype is None:
            raise TypeError("`param_dtype` must be a floating dtype, got None.")

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Each layer's entry of `LAYER_TYPES`: `layer_types`, or its default (all
        ``"sliding_attention"`` with a `sliding_window`, else all ``"full_attention"``)."""
        if self.layer_types is not None:
            return self.layer_types
        return (LAYER_TYPES[1] if self.sliding_window is not None else LAYER_TYPES[0],) * self.depth

    @property
    def rope_scaling_dict(self) -> dict | None:
        """`rope_scaling` as a dict (None when off)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def _checked_rope_scaling(scaling) -> tuple | None:
    if scaling is None:
        return None
    items = dict(scaling)
    kind = items.pop("rope_type", items.pop("type", None))
    if kind in (None, "default") and not items:
        return None
    if kind not in _ROPE_KEYS:
        raise ValueError(
            f"`rope_scaling` type {kind!r} is not supported (supported: None, 'default', "
            f"{sorted(_ROPE_KEYS)})."
        )
    extra = set(items) - _ROPE_KEYS[kind]
    missing = _ROPE_KEYS[kind] - set(items)
    if extra or missing:
        raise ValueError(
            f"`rope_scaling` of type {kind!r} needs exactly the keys "
            f"{sorted(_ROPE_KEYS[kind])}; missing {sorted(missing)}, unsupported {sorted(extra)}."
        )
    for key, value in items.items():
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"`rope_scaling[{key!r}]` must be a number > 0, got {value!r}.")
    return tuple(sorted({"rope_type": kind, **items}.items()))


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, depth=2, heads=4, kv_heads=2, mlp_dim=192, max_len=1024),
    "small": dict(dim=128, depth=2, heads=4, kv_heads=2, mlp_dim=384, max_len=1024),
    "base": dict(dim=256, depth=4, heads=8, kv_heads=4, mlp_dim=768, max_len=1024),
}
"""Name -> sizes of the library's own Llama-style models (SiLU, tied head, GQA)."""


def preset(name: str, *, vocab_size: int, **overrides) -> TransformerConfig:
    """A named size from `PRESETS` with `vocab_size` and any field overridden.

    Example:
      >>> from mtkd_jax.models.transformer import preset
      >>> cfg = preset("small", vocab_size=8192, depth=4)
      >>> cfg.dim, cfg.depth, cfg.vocab_size
      (128, 4, 8192)
    """
    if name not in PRESETS:
        raise ValueError(f"`name` must be one of {sorted(PRESETS)}, got {name!r}.")
    return TransformerConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- functions


def rope_frequencies(head_dim: int, *, theta: float, scaling=None) -> np.ndarray:
    """The rotary inverse frequencies `[D/2]` (float32), `theta ** (-2i / D)`, rescaled.

    `scaling` as `TransformerConfig.rope_scaling` (a dict or its tuple of items): ``linear``
    divides every frequency by `factor`; ``llama3`` divides the low frequencies (wavelength
    above `original_max_position_embeddings / low_freq_factor`) by `factor`, keeps the high
    ones (wavelength below `... / high_freq_factor`) and interpolates between.

    Example:
      >>> from mtkd_jax.models.transformer import rope_frequencies
      >>> rope_frequencies(4, theta=100.0).tolist()
      [1.0, 0.10000000149011612]
    """
    inv = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = _checked_rope_scaling(scaling)
    if scaling is not None:
        s = dict(scaling)
        if s["rope_type"] == "linear":
            inv = inv / s["factor"]
        else:  # llama3
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old = s["original_max_position_embeddings"]
            wavelen = 2 * np.pi / inv
            scaled = np.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotary position embedding of `x` `[B, L, H, D]` at `positions` `[B, L]`.

    Dimension i and i + D/2 form a pair rotated by the angle `position * inv_freq[i]`
    (float32 angles, as the published reference implementations compute them); the result
    is in `x`'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models.transformer import apply_rope, rope_frequencies
      >>> x = jnp.ones((1, 3, 2, 4))
      >>> y = apply_rope(x, jnp.arange(3)[None], rope_frequencies(4, theta=1e4))
      >>> y.shape, bool(jnp.allclose(y[:, 0], x[:, 0]))
      ((1, 3, 2, 4), True)
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]  # [B, L, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions `[B, L]` that restart at 0 wherever the segment id changes along a row.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models.transformer import segment_positions
      >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 3]])).tolist()
      [[0, 1, 2, 0, 1, 0]]
    """
    segment_ids = jnp.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool),
         segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - start_index


def attention_mask(
    length: int,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Where query i may attend to key j: `[B, L, L]` bool (`[1, L, L]` without per-row args).

    `j <= i`; and `segment_ids[j] == segment_ids[i]`; and `mask[j] > 0` (key j is a real
    token); and, with a `window` W, `i - j < W`.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtkd_jax.models.transformer import attention_mask
      >>> attention_mask(3, segment_ids=jnp.array([[1, 1, 2]]))[0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    index = jnp.arange(length)
    allowed = (index[:, None] >= index[None, :])[None]
    if window is not None:
        allowed = allowed & ((index[:, None] - index[None, :]) < window)[None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if mask is not None:
        allowed = allowed & (mask > 0)[:, None, :]
    return allowed


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2, -1) + eps) * (offset + scale)` over the last axis, in float32.

    The param `scale` `[E]` starts at `1 - offset` (the identity). Output in `x`'s dtype.
    """

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0, param_dtype=jnp.float32):
        self.eps, self.offset = eps, offset
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def _norm(cfg: TransformerConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=cfg.norm_eps, offset=cfg.norm_offset, param_dtype=cfg.param_dtype)


def _init(fan_in: int):
    return jax.nn.initializers.normal(stddev=fan_in**-0.5)


class Attention(nnx.Module):
    """Causal self-attention with grouped-query attention, `[B, L, E] -> [B, L, E]`.

    Params: `q/kernel` `[E, H, D]`, `k/kernel` and `v/kernel` `[E, G, D]` (with `qkv_bias`,
    `q/bias` `[H, D]`, `k/bias` and `v/bias` `[G, D]`), `o/kernel` `[H, D, E]`; with
    `qk_norm`, `q_norm/scale` and `k_norm/scale` `[D]`. Query head h uses key/value head
    `h // (H / G)`.
    """

    def __init__(self, cfg: TransformerConfig, *, sliding: bool, rngs: nnx.Rngs):
        e, h, g, d = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = nnx.LinearGeneral(e, (h, d), use_bias=cfg.qkv_bias, kernel_init=_init(e),
                                   **dense)
        self.k = nnx.LinearGeneral(e, (g, d), use_bias=cfg.qkv_bias, kernel_init=_init(e),
                                   **dense)
        self.v = nnx.LinearGeneral(e, (g, d), use_bias=cfg.qkv_bias, kernel_init=_init(e),
                                   **dense)
        self.o = nnx.LinearGeneral((h, d), e, axis=(-2, -1), use_bias=False,
                                   kernel_init=_init(h * d), **dense)
        self.q_norm = _norm(cfg, d) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, d) if cfg.qk_norm else None
        self.sliding = sliding
        local = sliding and cfg.local_rope_theta is not None
        inv = rope_frequencies(d, theta=cfg.local_rope_theta if local else cfg.rope_theta,
                               scaling=None if local else cfg.rope_scaling)
        self.inv_freq = tuple(float(f) for f in inv)  # static: hashable in the graphdef
        self.groups = h // g
        self.scale = (cfg.query_scale if cfg.query_scale is not None else d) ** -0.5
        self.softcap = cfg.attn_logit_softcap

    def __call__(self, x: jax.Array, positions: jax.Array, allowed: jax.Array) -> jax.Array:
        """`x` `[B, L, E]`, `positions` `[B, L]`, `allowed` `[B or 1, L, L]` bool."""
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, L, H, D], [B, L, G, D] x2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = np.asarray(self.inv_freq, np.float32)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        b, length, heads, d = q.shape
        q = q.reshape(b, length, heads // self.groups, self.groups, d)  # [B, L, G, H/G, D]
        logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, preferred_element_type=jnp.float32)
        logits = _softcap(logits * self.scale, self.softcap)
        logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, length, heads, d)
        return self.o(out)


class GatedMLP(nnx.Module):
    """Gated MLP `down(act(gate(x)) * up(x))`, `[B, L, E] -> [B, L, E]`.

    Params: `gate/kernel` and `up/kernel` `[E, F]`, `down/kernel` `[F, E]`.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        e, f = cfg.dim, cfg.mlp_dim
        dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate = nnx.Linear(e, f, kernel_init=_init(e), **dense)
        self.up = nnx.Linear(e, f, kernel_init=_init(e), **dense)
        self.down = nnx.Linear(f, e, kernel_init=_init(f), **dense)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm decoder block: `h + [post](attn(attn_norm(h)))`, then the same with the MLP.

    Params: `attn_norm`, `attn`, `mlp_norm`, `mlp`; with `post_norms`, `attn_post_norm` and
    `mlp_post_norm` (each norm `.../scale` `[E]`).
    """

    def __init__(self, cfg: TransformerConfig, *, sliding: bool, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg, cfg.dim)
        self.attn = Attention(cfg, sliding=sliding, rngs=rngs)
        self.mlp_norm = _norm(cfg, cfg.dim)
        self.mlp = GatedMLP(cfg, rngs=rngs)
        self.attn_post_norm = _norm(cfg, cfg.dim) if cfg.post_norms else None
        self.mlp_post_norm = _norm(cfg, cfg.dim) if cfg.post_norms else None

    def __call__(self, h: jax.Array, positions: jax.Array, allowed: jax.Array) -> jax.Array:
        """`h` `[B, L, E]`, `positions` `[B, L]`, `allowed` `[B or 1, L, L]` -> `[B, L, E]`."""
        a = self.attn(self.attn_norm(h), positions, allowed)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        h = h + a
        m = self.mlp(self.mlp_norm(h))
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        return h + m


class Transformer(nnx.Module):
    """Decoder-only transformer: tokens `[B, L]` -> logits `[B, L, V]` (see the module doc).

    Params: `embed/embedding` `[V, E]`, `layers/<i>/...` (`Block`), `norm/scale` `[E]`, and,
    without `tie_embeddings`, `out/kernel` `[E, V]`.

    Args:
      config: a `TransformerConfig`.
      rngs: `nnx.Rngs` for the initial params.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from mtkd_jax.models.transformer import Transformer, preset
      >>> model = Transformer(preset("tiny", vocab_size=32, depth=1), rngs=nnx.Rngs(0))
      >>> x = {"tokens": jnp.ones((2, 6), jnp.int32),
      ...      "segment_ids": jnp.array([[1, 1, 1, 2, 2, 2]] * 2)}
      >>> model.features(x).shape, model(x).shape
      ((2, 6, 64), (2, 6, 32))
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransformerConfig):
            raise TypeError(
                f"`config` must be a TransformerConfig, got {type(config).__name__}."
            )
        cfg = self.config = config
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, embedding_init=_init(cfg.dim),
                               rngs=rngs)
        self.layers = nnx.List([
            Block(cfg, sliding=kind == "sliding_attention", rngs=rngs)
            for kind in cfg.attention_types
        ])
        self.norm = _norm(cfg, cfg.dim)
        self.out = None if cfg.tie_embeddings else nnx.Linear(
            cfg.dim, cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_init(cfg.dim), rngs=rngs)

    def _inputs(self, x, segment_ids, positions, mask):
        given = {"segment_ids": segment_ids, "positions": positions, "mask": mask}
        if isinstance(x, Mapping):
            unknown = sorted(set(x) - set(_INPUT_KEYS))
            if unknown or "tokens" not in x:
                raise ValueError(
                    f"`x` as a dict must have the key 'tokens' and optionally "
                    f"{list(_INPUT_KEYS[1:])}; got keys {sorted(x)}."
                )
            for key in given:
                if key in x:
                    if given[key] is not None:
                        raise ValueError(f"`{key}` is given both in `x` and as a keyword.")
                    given[key] = x[key]
            x = x["tokens"]
        tokens = jnp.asarray(x)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"the tokens must be an int array [B, L], got shape {tokens.shape} and dtype "
                f"{tokens.dtype}."
            )
        for key, value in given.items():
            if value is not None and jnp.shape(value) != tokens.shape:
                raise ValueError(
                    f"`{key}` must have the tokens' shape [B, L]={tokens.shape}, got "
                    f"{jnp.shape(value)}."
                )
        cfg = self.config
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(
                f"the rows are {tokens.shape[1]} tokens long but the model's rotary table "
                f"holds max_len={cfg.max_len} positions: pack shorter rows or build the model "
                "with a larger `max_len`."
            )
        _check_values(tokens, "tokens", 0, cfg.vocab_size)
        if given["positions"] is not None:
            _check_values(given["positions"], "positions", 0, cfg.max_len)
        if given["segment_ids"] is not None:
            check_segment_ids(given["segment_ids"], given["mask"])
        return tokens, given["segment_ids"], given["positions"], given["mask"]

    def features(
        self,
        x,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """`x` (tokens `[B, L]` or the dict of the module docstring) -> features `[B, L, E]`
        after the final norm, in the compute dtype."""
        tokens, segment_ids, positions, mask = self._inputs(x, segment_ids, positions, mask)
        cfg = self.config
        length = tokens.shape[1]
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(length), tokens.shape)
                         if segment_ids is None else segment_positions(segment_ids))
        positions = jnp.asarray(positions, jnp.int32)
        h = self.embed(tokens)
        if cfg.embed_scale:
            h = h * jnp.asarray(math.sqrt(cfg.dim), h.dtype)
        full = attention_mask(length, segment_ids=segment_ids, mask=mask)
        local = None
        if cfg.sliding_window is not None:
            local = attention_mask(length, segment_ids=segment_ids, mask=mask,
                                   window=cfg.sliding_window)
        for layer in self.layers:
            h = layer(h, positions, local if layer.attn.sliding else full)
        return self.norm(h)

    def head(self, f: jax.Array) -> jax.Array:
        """Features `[..., E]` -> float32 logits `[..., V]` (soft-capped when configured)."""
        # The product runs on `[N, E]` rows, the leading axes flattened: the gradient of a
        # product over `[B, L, E]` features contracts two axes, which XLA:CPU lowers with a
        # transposed copy of the `[B, L, V]` logits' gradient (benchmarks/RESULTS.md, "Where
        # the rest of the step went").
        lead = f.shape[:-1]
        f = f.reshape(-1, f.shape[-1])
        logits = self.embed.attend(f) if self.out is None else self.out(f)
        logits = logits.reshape(lead + logits.shape[-1:])
        return _softcap(logits.astype(jnp.float32), self.config.final_logit_softcap)

    def __call__(self, x, **inputs) -> jax.Array:
        """`head(features(x, **inputs))`: logits `[B, L, V]`."""
        return self.head(self.features(x, **inputs))


def _check_values(values, name: str, low: int, high: int) -> None:
    """Concrete integer values must lie in `[low, high)`; traced ones pass."""
    if _checks.is_traced(values):
        return
    v = np.asarray(values)
    if v.size and (v.min() < low or v.max() >= high):
        raise ValueError(
            f"`{name}` must lie in [{low}, {high}), got values in [{v.min()}, {v.max()}]."
        )
