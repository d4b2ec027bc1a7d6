"""Regenerate the published-checkpoint fixtures in tests/fixtures/checkpoints/ (bench extra).

Each fixture is a tiny random-weight model of one family built with the reference
implementation (Hugging Face `transformers`, PyTorch) and saved as a real checkpoint
directory: `config.json`, `model.safetensors` (or shards with `model.safetensors.index.json`),
`generation_config.json` and a `tokenizer.json` (a small byte-level BPE trained with
`tokenizers` on tests/fixtures/checkpoints/corpus.txt). Beside them, `reference.safetensors`
holds the token ids, the attention mask (right padding) and the reference logits, and its
metadata the texts the ids were encoded from.

The weights are drawn with NumPy (seeded, independent of torch's initialisers) at scales
that give well-separated logits, norms scattered around their identity value and biases
non-zero, so that every mapped option changes the logits. The options are set small where
a published value would not act on 12-token sequences (softcaps, sliding windows, the
llama3 rope's original context), so a loader that ignored one would fail the 1e-4 test.

The references come from the saved directory loaded back with `from_pretrained`, as a user
loads a published model. Float32 fixtures: the reference is the model run in float64
(saved as float32). The bf16 fixture (`llama_bf16`, same config as `llama`, its own
weights) keeps bf16 weights and has two references: `logits` from the model loaded and run
in bf16, and `logits_f32` from the same bf16 weights loaded in float64.

Deterministic: running it twice gives byte-identical files (single-threaded torch; sorted
JSON; safetensors without time stamps). Run from the repository root:

    pip install -e '.[bench]'
    python benchmarks/make_checkpoint_fixtures.py && git diff --stat tests/fixtures
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "checkpoints"
CORPUS = ROOT / "corpus.txt"
VOCAB = 256
PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"
TEXTS = (
    "The river runs past the old mill and the bakers start at six.",
    "A good student keeps what is true from every voice.",
    "Maps are promises.",
)
LENGTHS = (12, 9, 8)
"""Right padding: the rows are cut to these lengths in one [3, 12] batch. A padded query
whose whole sliding window is padding gets NaN in the reference (0 * NaN in its attention
sums), so no row is shorter than 12 - window + 1."""

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    attention_dropout=0.0,
    use_cache=False,
)


def _families():
    """name -> (config class name, config kwargs, options of the fixture)."""
    return {
        # GQA (4 query heads over 2 KV heads), llama3 rope scaling, untied head, silu;
        # saved in shards with an index file.
        "llama": ("LlamaConfig", dict(
            COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            hidden_act="silu",
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16),
        ), dict(seed=1, shard="24KB")),
        "llama_bf16": ("LlamaConfig", dict(
            COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            hidden_act="silu",
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16),
        ), dict(seed=2, bf16=True)),
        # q/k/v biases, tied embeddings, an embedding padded past the tokenizer (as Qwen2's
        # 151936 rows for 151646 tokens).
        "qwen2": ("Qwen2Config", dict(
            COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, hidden_act="silu",
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ), dict(seed=3)),
        # QK-norm, head_dim (16) != hidden / heads (8), untied.
        "qwen3": ("Qwen3Config", dict(
            COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ), dict(seed=4)),
        # Gemma (1): multi-query attention, (1 + w) norms, embedding scaled by sqrt(width),
        # tanh-GELU, head_dim independent of the width, tied.
        "gemma": ("GemmaConfig", dict(
            COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ), dict(seed=7, offset_norms=True)),
        # Logit soft-caps on attention and output, sandwich norms, (1 + w) norms, embedding
        # scaled by sqrt(width), tanh-GELU, query_pre_attn_scalar != head_dim, sliding window
        # on the first layer, tied.
        "gemma2": ("Gemma2Config", dict(
            COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0, final_logit_softcapping=8.0, sliding_window=5,
            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ), dict(seed=5, offset_norms=True)),
        # QK-norm with (1 + w), local (10k) and global (1M, linear x2) rotary bases,
        # sliding window on the first layer, sandwich norms, no softcaps.
        "gemma3": ("Gemma3TextConfig", dict(
            COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16,
            sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
            rope_parameters={
                "full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            },
        ), dict(seed=6, offset_norms=True)),
    }


def train_tokenizer():
    """A byte-level BPE of exactly `VOCAB` tokens trained on the corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"the BPE has {tok.get_vocab_size()} tokens, wanted {VOCAB}")
    return tok


def _weights(model, seed: int, *, offset_norms: bool) -> dict:
    """Seeded NumPy weights for every parameter of `model` (float64)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in sorted(model.state_dict().items()):
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            base = 0.0 if offset_norms else 1.0
            w = base + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.3 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:  # [out, in] linear weights
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = w
    if model.config.tie_word_embeddings and "lm_head.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # one tensor, one value
    return out


def _logits(directory: pathlib.Path, ids, mask, dtype):
    """Logits of the checkpoint loaded back from `directory` as a user would (from_pretrained
    keeps the rotary frequencies in float32 whatever the dtype; `.to(dtype)` would not)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.to(torch.float64).numpy().astype(np.float32)


def _save_json(path: pathlib.Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build(name: str, spec, tok, ids, mask) -> None:
    import torch
    import transformers
    from safetensors.numpy import save_file

    cls_name, kwargs, opts = spec
    config = getattr(transformers, cls_name)(
        pad_token_id=tok.token_to_id(PAD_TOKEN), eos_token_id=tok.token_to_id(EOS_TOKEN),
        bos_token_id=None, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    weights = _weights(model, opts["seed"], offset_norms=opts.get("offset_norms", False))
    bf16 = opts.get("bf16", False)
    store = torch.bfloat16 if bf16 else torch.float32
    state = {k: torch.from_numpy(v).to(store) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    model = model.to(store)

    out = ROOT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, max_shard_size=opts.get("shard", "50GB"))
    # save_pretrained's JSON is already sorted; rewrite it to be sure of one byte layout.
    for f in sorted(out.glob("*.json")):
        _save_json(f, json.loads(f.read_text(encoding="utf-8")))
    tok.save(str(out / "tokenizer.json"), pretty=True)

    refs = {"input_ids": ids, "attention_mask": mask}
    if bf16:
        refs["logits"] = _logits(out, ids, mask, torch.bfloat16)
        refs["logits_f32"] = _logits(out, ids, mask, torch.float64)
    else:
        refs["logits"] = _logits(out, ids, mask, torch.float64)
    for key in [k for k in refs if k.startswith("logits")]:
        if not np.isfinite(refs[key][mask.astype(bool)]).all():
            raise RuntimeError(f"{name}: non-finite reference {key} at a real token")
    save_file(refs, str(out / "reference.safetensors"),
              # One metadata key: safetensors writes several in an arbitrary order.
              metadata={"fixture": json.dumps({
                  "texts": list(TEXTS), "lengths": list(LENGTHS),
                  "reference": f"transformers {transformers.__version__}, eager attention, "
                               "run in float64 (logits: bf16 in llama_bf16)"}, sort_keys=True)})


def main(argv=None) -> int:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = train_tokenizer()
    pad = tok.token_to_id(PAD_TOKEN)
    ids = np.full((len(TEXTS), max(LENGTHS)), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, (text, n) in enumerate(zip(TEXTS, LENGTHS, strict=True)):
        enc = tok.encode(text).ids
        if len(enc) < n:
            raise RuntimeError(f"{text!r} has {len(enc)} tokens, fewer than {n}")
        ids[row, :n] = enc[:n]
        mask[row, :n] = 1
    names = argv if argv else list(_families())
    for name in names:
        build(name, _families()[name], tok, ids, mask)
        print(f"{name}: {sorted(p.name for p in (ROOT / name).iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
