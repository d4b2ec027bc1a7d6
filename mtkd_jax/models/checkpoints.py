"""Published checkpoints as the library's transformer: `load_pretrained`.

A Hugging Face checkpoint directory of one of the families in
`mtkd_jax.models.checkpoint_config` (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`, `tokenizer.json`) becomes a `Pretrained`: the NNX
`Transformer` with the checkpoint's weights, its `TransformerConfig`, the tokenizer and the
tokenizer's fingerprint. Nothing is downloaded and PyTorch is not needed.

* Weights are read with `safetensors` one tensor at a time (numpy; bfloat16 through its
  Flax reader on the host CPU, numpy having no bfloat16), converted to the transformer's
  layout (a `[out, in]` linear weight becomes `kernel [in..., out...]`, heads split out)
  and kept in the checkpoint's dtype (bfloat16 stays bfloat16) unless `dtype` is given.
* With a `mesh`, each weight is placed straight into its shards by the sharding `rule`
  (`mtkd_jax.parallel`, default `fsdp()`): `jax.make_array_from_callback` cuts each device's
  part from the host copy of that one tensor, so no device ever holds a whole model it
  cannot fit.
* Errors name what is wrong: a missing or unexpected tensor (by name), a tensor whose shape
  differs from what the config needs (both shapes), a shard file the index names but the
  directory lacks, a tokenizer with more tokens than the embedding has rows.

The tokenizer's fingerprint (`tokenizer_fingerprint`) is the SHA-256 of its canonical JSON
(keys sorted, no whitespace, ASCII-escaped), so the same tokenizer saved pretty or compact
has one fingerprint; a sequence cache stores it to know which tokenizer its inputs speak.
(The same definition as the text data's `TextTokenizer.fingerprint`, being written on
another branch: one of the two should call the other once both land.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import ExitStack, nullcontext
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from mtkd_jax.models.checkpoint_config import transformer_config
from mtkd_jax.models.transformer import Transformer, TransformerConfig

__all__ = ["Pretrained", "load_pretrained", "tokenizer_fingerprint",
           "checkpoint_tensor_names"]

_IGNORED = re.compile(r".*rotary_emb\.inv_freq")
"""Buffers some older checkpoints saved that are not weights."""


class Pretrained(NamedTuple):
    """A loaded published checkpoint.

    Attributes:
      model: the `Transformer` holding the checkpoint's weights (`nnx.split(model,
        nnx.Param)` or `mtkd_jax.models.zoo.token.token_model_fns(model)` for its params).
      config: its `TransformerConfig`.
      tokenizer: the `tokenizers.Tokenizer` of `tokenizer.json` (None with
        `tokenizer=False`).
      tokenizer_fingerprint: `tokenizer_fingerprint(tokenizer)` (None without one).
      family: the config's `model_type`.
      path: the checkpoint directory.
    """

    model: Transformer
    config: TransformerConfig
    tokenizer: Any
    tokenizer_fingerprint: str | None
    family: str
    path: str


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 (hex) of a `tokenizers.Tokenizer`'s canonical JSON (sorted keys, compact).

    Example:
      >>> from tokenizers import Tokenizer, models
      >>> a = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
      >>> b = Tokenizer(models.WordLevel({"a": 0, "b": 2}, unk_token="a"))
      >>> len(tokenizer_fingerprint(a)), tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
      (64, False)
    """
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _checkpoint_tokenizer(path: str, *, vocab_size: int | None = None):
    """The `tokenizers.Tokenizer` of `path/tokenizer.json`, checked against `vocab_size`.

    A checkpoint's embedding may have more rows than its tokenizer has tokens (Qwen2 pads
    151646 tokens to 151936 rows), never fewer: a token id at or past `vocab_size` is a
    ValueError naming both sizes.
    """
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path!r} has no tokenizer.json (found {sorted(os.listdir(path))}); pass "
            "tokenizer=False to load the weights alone."
        )
    tokenizer = Tokenizer.from_file(file)
    if vocab_size is not None:
        largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
        if largest >= vocab_size:
            raise ValueError(
                f"{file}: the tokenizer's vocabulary ({tokenizer.get_vocab_size()} tokens, "
                f"ids up to {largest}) does not fit the model's embedding of vocab_size="
                f"{vocab_size} rows: this tokenizer is not the checkpoint's."
            )
    return tokenizer


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found: not a checkpoint directory.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None


def checkpoint_tensor_names(path: str) -> dict[str, str]:
    """`{tensor name: safetensors file}` of a checkpoint directory (single file or shards)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no `weight_map` of tensor name -> shard file.")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise FileNotFoundError(
                f"{index} names shard files the directory lacks: {absent}."
            )
        return {name: os.path.join(path, f) for name, f in weight_map.items()}
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="np") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(
        f"{path!r} has neither model.safetensors nor model.safetensors.index.json (found "
        f"{sorted(os.listdir(path))})."
    )


def _hf_name(path: str, cfg: TransformerConfig) -> tuple[str, int]:
    """The checkpoint tensor of a transformer param path, and its number of input axes
    (0 for a tensor copied as it is, else a `[out, in]` weight to transpose)."""
    parts = path.split("/")
    if path == "embed/embedding":
        return "model.embed_tokens.weight", 0
    if path == "norm/scale":
        return "model.norm.weight", 0
    if path == "out/kernel":
        return "lm_head.weight", 1
    layer, rest = int(parts[1]), "/".join(parts[2:])
    norms = {"attn_norm/scale": "input_layernorm.weight"}
    if cfg.post_norms:
        norms.update({"attn_post_norm/scale": "post_attention_layernorm.weight",
                      "mlp_norm/scale": "pre_feedforward_layernorm.weight",
                      "mlp_post_norm/scale": "post_feedforward_layernorm.weight"})
    else:
        norms["mlp_norm/scale"] = "post_attention_layernorm.weight"
    prefix = f"model.layers.{layer}."
    if rest in norms:
        return prefix + norms[rest], 0
    module, _, leaf = rest.rpartition("/")
    names = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj",
             "attn/v": "self_attn.v_proj", "attn/o": "self_attn.o_proj",
             "attn/q_norm": "self_attn.q_norm", "attn/k_norm": "self_attn.k_norm",
             "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj"}
    if module not in names:
        raise ValueError(f"no checkpoint tensor is known for the transformer param {path!r}.")
    hf = prefix + names[module] + (".bias" if leaf == "bias" else ".weight")
    if leaf != "kernel":
        return hf, 0
    return hf, 2 if module == "attn/o" else 1


class _Reader:
    """Tensors by name from safetensors files opened once each (numpy; bf16 via Flax)."""

    def __init__(self, files: dict[str, str], stack: ExitStack):
        self.files, self.stack, self.open = files, stack, {}

    def _handle(self, file: str, framework: str):
        from safetensors import safe_open

        if (file, framework) not in self.open:
            self.open[file, framework] = self.stack.enter_context(
                safe_open(file, framework=framework))
        return self.open[file, framework]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        view = self._handle(self.files[name], "np").get_slice(name)
        return tuple(view.get_shape()), view.get_dtype()

    def read(self, name: str) -> np.ndarray:
        file = self.files[name]
        if self.shape_dtype(name)[1] != "BF16":
            return self._handle(file, "np").get_tensor(name)
        cpus = [d for b in ("cpu",) for d in _devices(b)]
        with jax.default_device(cpus[0]) if cpus else nullcontext():
            return np.asarray(self._handle(file, "flax").get_tensor(name))


def _devices(backend: str) -> list:
    try:
        return jax.devices(backend)
    except RuntimeError:
        return []


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _checkpoint_dtype(reader: _Reader) -> str:
    found = sorted({reader.shape_dtype(n)[1] for n in reader.files})
    floats = [d for d in found if d in _DTYPES]
    if not floats:
        raise ValueError(f"the checkpoint has no floating-point tensors (dtypes {found}).")
    if len(floats) > 1:  # mixed: the widest wins, nothing is rounded
        order = ["BF16", "F16", "F32", "F64"]
        floats = [max(floats, key=order.index)]
    return _DTYPES[floats[0]]


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rule: Any = None,
    max_len: int | None = None,
    tokenizer: bool = True,
) -> Pretrained:
    """Load a published checkpoint directory into the library's `Transformer`.

    Args:
      path: the directory (`config.json`, `model.safetensors` or its shards and index,
        `tokenizer.json`).
      dtype: the params' dtype (default: the checkpoint's, e.g. bfloat16 stays bfloat16).
      mesh: place each weight into its shards on this mesh (`mtkd_jax.parallel.make_mesh`);
        None: on the default device.
      rule: the sharding rule with a `mesh` (default `mtkd_jax.parallel.fsdp()`).
      max_len: the longest row the model accepts (default `max_position_embeddings`).
      tokenizer: load `tokenizer.json` and check it against the embedding.

    Returns:
      A `Pretrained` (model, config, tokenizer, tokenizer_fingerprint, family, path).

    Raises:
      FileNotFoundError: no config, weights, shard or tokenizer file.
      ValueError: an unsupported family or option (naming the key and value), a missing,
        unexpected or wrongly shaped tensor (naming it, with both shapes), a tokenizer that
        does not fit the embedding.
    """
    path = os.fspath(path)
    raw = _read_json(os.path.join(path, "config.json"))
    files = checkpoint_tensor_names(path)
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        param_dtype = dtype if dtype is not None else _checkpoint_dtype(reader)
        cfg = transformer_config(raw, max_len=max_len, param_dtype=param_dtype)
        tok = _checkpoint_tokenizer(path, vocab_size=cfg.vocab_size) if tokenizer else None
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract, nnx.Param)
        target = nnx.to_pure_dict(state)
        flat = jax.tree_util.tree_flatten_with_path(target)
        names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat[0]]
        shardings = None
        if mesh is not None:
            from mtkd_jax.parallel.rules import fsdp, tree_shardings

            shardings = jax.tree.leaves(tree_shardings(
                target, mesh, fsdp() if rule is None else rule))
        wanted = {name: _hf_name(name, cfg) for name in names}
        used = {hf for hf, _ in wanted.values()}
        missing = sorted(hf for hf in used if hf not in files)
        if missing:
            raise ValueError(
                f"{path}: tensors the config needs are missing from the checkpoint: {missing}."
            )
        unexpected = sorted(n for n in files if n not in used and not _IGNORED.fullmatch(n)
                            and not (cfg.tie_embeddings and n == "lm_head.weight"))
        if unexpected:
            raise ValueError(
                f"{path}: the checkpoint has tensors the {raw.get('model_type')} config does "
                f"not use (a different architecture or option?): {unexpected}."
            )
        leaves = []
        for i, (name, (_, sds)) in enumerate(zip(names, flat[0], strict=True)):
            hf, n_in = wanted[name]
            host = _converted(reader, hf, n_in, name, sds)
            if shardings is None:
                leaves.append(jax.device_put(host))
            else:
                leaves.append(jax.make_array_from_callback(
                    host.shape, shardings[i], lambda index, h=host: h[index]))
    params = jax.tree.unflatten(flat[1], leaves)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    fingerprint = None if tok is None else tokenizer_fingerprint(tok)
    return Pretrained(model, cfg, tok, fingerprint, raw["model_type"], path)


def _converted(reader: _Reader, hf: str, n_in: int, name: str, sds) -> np.ndarray:
    """Checkpoint tensor `hf` in the layout and dtype of the transformer param `name`."""
    target = tuple(sds.shape)
    if n_in:  # a [out, in] weight: kernel [in..., out...]
        expected = (math.prod(target[n_in:]), math.prod(target[:n_in]))
    else:
        expected = (math.prod(target),) if name.endswith("/bias") else target
    shape, _ = reader.shape_dtype(hf)
    if shape != expected:
        raise ValueError(
            f"tensor {hf!r} has shape {shape} in the checkpoint, but the config needs "
            f"{expected} (for the transformer's {name!r}, {target})."
        )
    array = reader.read(hf)
    if n_in:
        array = array.T
    return np.ascontiguousarray(array.reshape(target)).astype(sds.dtype, copy=False)
