"""A published checkpoint's `config.json` as a `TransformerConfig`: `transformer_config`.

The Hugging Face configurations of the families the library's transformer expresses
exactly, in both the layout `transformers` 4.x writes (`rope_theta`, `rope_scaling`,
Gemma3's `rope_local_base_freq` and `sliding_window_pattern`) and the 5.x one
(`rope_parameters`, `layer_types`):

=============  ======================================================================
model_type     what the family needs (all mapped exactly)
=============  ======================================================================
llama          GQA, rope (default / linear / llama3 scaling), SiLU MLP, tied or not
qwen2          as llama, plus q/k/v biases
qwen3          as llama, plus QK-norm and any head_dim
gemma          tanh-GELU, (1 + w) norms, embedding times sqrt(width), tied, head_dim
gemma2         as gemma, plus attention/final soft-caps, sandwich norms,
               query_pre_attn_scalar, sliding window on alternate layers
gemma3_text    as gemma2 (caps optional), plus QK-norm, local rotary base on the
               sliding layers and rope scaling on the global ones
=============  ======================================================================

Anything else (another `model_type`, rope types such as YaRN or dynamic NTK, biases the
transformer lacks, Qwen's `use_sliding_window`, a GELU other than tanh-GELU, layer types
other than full and sliding attention) is a ValueError naming the key and its value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mtkd_jax.models.transformer import TransformerConfig

__all__ = ["FAMILIES", "transformer_config"]

FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
"""The `model_type`s `transformer_config` maps."""

_GEMMA = ("gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json: `{key}` = {value!r} is not supported: {why}.")


def _rope(params: Mapping | None, key: str) -> tuple[float | None, dict | None]:
    """`(theta, scaling)` of one rope dict (`rope_scaling` or a `rope_parameters` entry)."""
    if params is None:
        return None, None
    if not isinstance(params, Mapping):
        raise _unsupported(key, params, "expected a dict")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if kind == "default":
        return theta, None
    if kind not in _ROPE_KEYS:
        raise _unsupported(f"{key}.rope_type", kind,
                           f"the transformer has rotary types default, {', '.join(_ROPE_KEYS)}")
    missing = [k for k in _ROPE_KEYS[kind] if params.get(k) is None]
    if missing:
        raise _unsupported(key, dict(params), f"rope type {kind!r} needs {missing}")
    return theta, {"rope_type": kind, **{k: params[k] for k in _ROPE_KEYS[kind]}}


def _rotary(cfg: Mapping, family: str, layer_types: tuple[str, ...]) -> dict:
    """`rope_theta`, `rope_scaling`, `local_rope_theta` from either config layout."""
    params = cfg.get("rope_parameters")
    local = None
    if params is not None and family == "gemma3_text" and "full_attention" in params:
        theta, scaling = _rope(params["full_attention"], "rope_parameters.full_attention")
        local_params = params.get("sliding_attention")
        if local_params is not None:
            local, local_scaling = _rope(local_params, "rope_parameters.sliding_attention")
            if local_scaling is not None:
                raise _unsupported("rope_parameters.sliding_attention", dict(local_params),
                                   "sliding layers take no rotary scaling")
    elif params is not None:
        theta, scaling = _rope(params, "rope_parameters")
    else:
        theta, scaling = _rope(cfg.get("rope_scaling"), "rope_scaling")
        theta = cfg.get("rope_theta", theta)
        if family == "gemma3_text":
            local = cfg.get("rope_local_base_freq", 10000.0)
    if family == "gemma3_text" and "sliding_attention" not in layer_types:
        local = None
    default = 1000000.0 if family == "gemma3_text" else 10000.0
    return dict(rope_theta=float(default if theta is None else theta), rope_scaling=scaling,
                local_rope_theta=None if local is None else float(local))


def _layer_types(cfg: Mapping, family: str, depth: int) -> tuple[tuple[str, ...], int | None]:
    """Each layer's attention kind and the sliding window."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window", False):
        raise _unsupported("use_sliding_window", True,
                           "Qwen's windowed layers (past max_window_layers) are not modelled")
    if types is None:
        if family == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(depth)]
        elif family == "gemma3_text":
            pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(depth)]
        else:
            types = ["full_attention"] * depth
    types = tuple(types)
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            raise _unsupported("layer_types", list(types),
                               f"layer type {t!r} (the transformer has full_attention and "
                               "sliding_attention)")
    if len(types) != depth:
        raise _unsupported("layer_types", list(types), f"{depth} layers need {depth} entries")
    if "sliding_attention" not in types:
        window = None
    elif window is None:
        raise _unsupported("sliding_window", None, "layer_types names sliding layers")
    return types, window


def _flag(cfg: Mapping, key: str, allowed: bool, why: str) -> None:
    if cfg.get(key) and not allowed:
        raise _unsupported(key, cfg[key], why)


def transformer_config(
    cfg: Mapping[str, Any], *, max_len: int | None = None, param_dtype: Any = None
) -> TransformerConfig:
    """The `TransformerConfig` of a published checkpoint's `config.json` (a dict).

    Args:
      cfg: the parsed `config.json` of one of `FAMILIES`.
      max_len: the longest row the model accepts (default `max_position_embeddings`).
      param_dtype: the params' dtype (default float32; `load_pretrained` passes the
        checkpoint's).

    Raises:
      ValueError: a `model_type` not in `FAMILIES` or an option the transformer does not
        express, naming the key and its value.

    Example:
      >>> from mtkd_jax.models.checkpoint_config import transformer_config
      >>> c = transformer_config({"model_type": "qwen2", "vocab_size": 320, "hidden_size": 32,
      ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      ...     "num_key_value_heads": 2, "max_position_embeddings": 64,
      ...     "tie_word_embeddings": True, "rope_theta": 1e6})
      >>> c.kv_heads, c.head_dim, c.qkv_bias, c.tie_embeddings, c.rope_theta
      (2, 8, True, True, 1000000.0)
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"`cfg` must be the dict of a config.json, got {type(cfg).__name__}.")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        hint = (" (a multimodal Gemma 3: load its text-only checkpoint, model_type "
                "'gemma3_text')" if family == "gemma3" else "")
        raise _unsupported("model_type", family, f"supported families are {list(FAMILIES)}"
                           + hint)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"config.json: `{key}` must be an int, got {cfg.get(key)!r}.")
    gemma = family in _GEMMA
    if gemma:
        act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        act_key = "hidden_activation"
    else:
        act, act_key = cfg.get("hidden_act", "silu"), "hidden_act"
    if act not in _ACTIVATIONS:
        raise _unsupported(act_key, act, f"activations are {sorted(_ACTIVATIONS)}")
    _flag(cfg, "attention_bias", False, "the transformer has no output-projection bias")
    _flag(cfg, "mlp_bias", False, "the transformer's MLP has no biases")
    _flag(cfg, "use_bidirectional_attention", False, "the transformer is causal")
    if family != "gemma2" and family != "gemma3_text":
        _flag(cfg, "attn_logit_softcapping", False, f"{family} does not soft-cap")
        _flag(cfg, "final_logit_softcapping", False, f"{family} does not soft-cap")
    depth = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    types, window = _layer_types(cfg, family, depth)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tie_default = gemma
    query = cfg.get("query_pre_attn_scalar") if family in ("gemma2", "gemma3_text") else None
    return TransformerConfig(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        depth=depth,
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=cfg["intermediate_size"],
        max_len=max_len or cfg.get("max_position_embeddings", 2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=_ACTIVATIONS[act],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
        qk_norm=family in ("qwen3", "gemma3_text"),
        qkv_bias=family == "qwen2",
        attn_logit_softcap=cfg.get("attn_logit_softcapping") if family == "gemma2"
        or family == "gemma3_text" else None,
        final_logit_softcap=cfg.get("final_logit_softcapping") if family == "gemma2"
        or family == "gemma3_text" else None,
        embed_scale=gemma,
        norm_offset=1.0 if gemma else 0.0,
        post_norms=family in ("gemma2", "gemma3_text"),
        query_scale=None if query is None or math.isclose(query, head_dim) else float(query),
        sliding_window=window,
        layer_types=types,
        param_dtype="float32" if param_dtype is None else param_dtype,
        **_rotary(cfg, family, types),
    )
