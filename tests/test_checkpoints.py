"""Published checkpoints (tests/fixtures/checkpoints, made by
benchmarks/make_checkpoint_fixtures.py with `transformers`) loaded by the library alone.

Each fixture is a tiny random-weight model of one family with the family's options switched
on; its `reference.safetensors` holds a right-padded batch and the logits `transformers`
computed for it (float64 for the float32 fixtures). Compared at the real tokens only: a
padded position's output is meaningless in both implementations.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mtkd_jax.models.checkpoint_config import transformer_config
from mtkd_jax.models.checkpoints import load_pretrained, tokenizer_fingerprint
from mtkd_jax.models.transformer import Transformer
from mtkd_jax.parallel import fsdp, make_mesh
from mtkd_jax.teachers.published import load_published_teachers

ROOT = pathlib.Path(__file__).resolve().parent / "fixtures" / "checkpoints"
FLOAT32 = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


def _reference(name):
    ref = load_file(str(ROOT / name / "reference.safetensors"))
    x = {"tokens": jnp.asarray(ref["input_ids"], jnp.int32),
         "mask": jnp.asarray(ref["attention_mask"], jnp.int32)}
    return x, ref, ref["attention_mask"].astype(bool)


def _logits(model, x):
    return np.asarray(jax.jit(lambda m, x: m(x))(model, x))


@pytest.mark.parametrize("name", FLOAT32)
def test_float32_checkpoint_matches_transformers(name):
    pre = load_pretrained(ROOT / name)
    x, ref, real = _reference(name)
    out = _logits(pre.model, x)
    assert out.shape == ref["logits"].shape
    np.testing.assert_allclose(out[real], ref["logits"][real], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.argmax(-1)[real], ref["logits"].argmax(-1)[real])
    assert pre.model.embed.embedding.dtype == jnp.float32
    # The tokenizer from the same directory encodes the texts to the reference's ids.
    with safe_open(str(ROOT / name / "reference.safetensors"), framework="np") as f:
        meta = json.loads(f.metadata()["fixture"])
    for row, (text, n) in enumerate(zip(meta["texts"], meta["lengths"], strict=True)):
        assert pre.tokenizer.encode(text).ids[:n] == ref["input_ids"][row, :n].tolist()
    assert len(pre.tokenizer_fingerprint) == 64


def test_bf16_checkpoint_keeps_bf16_and_matches_transformers():
    """The bf16 checkpoint loads as bf16 and runs in bf16. Tolerance: both implementations
    round activations to bf16 (8 significant bits, a relative step of 2**-8) at different
    points, so on logits of magnitude up to ~4 they differ by a few bf16 steps of 2**-6:
    measured 0.047 (transformers' own bf16 run is 0.042 from its float32 run), allowed 0.15
    (a wrong mapping gives errors above 1e-2 to order 1, see
    `test_each_option_changes_the_logits`). The argmax is compared where the reference's
    top-2 margin exceeds twice that tolerance."""
    pre = load_pretrained(ROOT / "llama_bf16")
    assert pre.model.embed.embedding.dtype == jnp.bfloat16
    assert pre.model.layers[0].attn.q.kernel.dtype == jnp.bfloat16
    x, ref, real = _reference("llama_bf16")
    out = _logits(pre.model, x)
    for key in ("logits", "logits_f32"):
        np.testing.assert_allclose(out[real], ref[key][real], atol=0.15, rtol=0)
    top2 = np.sort(ref["logits"][real], -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.3
    assert clear.sum() >= 8  # the argmax check below is not vacuous
    np.testing.assert_array_equal(out.argmax(-1)[real][clear],
                                  ref["logits"].argmax(-1)[real][clear])


def test_bf16_checkpoint_cast_to_float32_matches_exactly():
    """The same bf16 weights loaded as float32 match transformers' float64 run on them."""
    pre = load_pretrained(ROOT / "llama_bf16", dtype="float32")
    assert pre.model.embed.embedding.dtype == jnp.float32
    x, ref, real = _reference("llama_bf16")
    out = _logits(pre.model, x)
    np.testing.assert_allclose(out[real], ref["logits_f32"][real], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.argmax(-1)[real], ref["logits_f32"].argmax(-1)[real])


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_sharded_load_on_8_devices_gives_the_same_logits(name):
    assert jax.device_count() == 8
    mesh = make_mesh(2, 4)
    pre = load_pretrained(ROOT / name, mesh=mesh, rule=fsdp(min_size=256))
    embedding = pre.model.embed.embedding[...]
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("model")
    assert {s.data.shape for s in embedding.addressable_shards} == {
        (pre.config.vocab_size // 4, pre.config.dim)}
    x, ref, real = _reference(name)
    out = _logits(pre.model, x)
    np.testing.assert_allclose(out[real], ref["logits"][real], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.argmax(-1)[real], ref["logits"].argmax(-1)[real])


def test_bf16_checkpoint_loads_into_shards_as_bf16():
    pre = load_pretrained(ROOT / "llama_bf16", mesh=make_mesh(2, 4), rule=fsdp(min_size=256))
    embedding = pre.model.embed.embedding[...]
    assert embedding.dtype == jnp.bfloat16
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("model")


def test_a_stacked_ensemble_loads_into_shards():
    """Each teacher placed into its shards, then stacked: the K axis whole, each slice laid
    out by the rule (as `sharding.stacked(rule)`)."""
    teachers = load_published_teachers([ROOT / "llama", ROOT / "llama_bf16"], dtype="float32",
                                       mesh=make_mesh(2, 4), rule=fsdp(min_size=256))
    embedding = teachers.teacher_params["embed"]["embedding"][...]
    assert embedding.shape == (2, 256, 32)
    assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    x, ref, real = _reference("llama")
    out = np.asarray(jax.jit(teachers.teacher_apply)(teachers.teacher_params, x))
    np.testing.assert_allclose(out[0][real], ref["logits"][real], atol=1e-4, rtol=0)


def test_two_checkpoints_of_one_family_stack_into_one_teacher():
    teachers = load_published_teachers([ROOT / "llama", ROOT / "llama_bf16"], dtype="float32")
    assert teachers.stacked and teachers.names == ("llama", "llama_bf16")
    leaf = jax.tree.leaves(teachers.teacher_params)[0]
    assert leaf.shape[0] == 2
    x, ref0, real = _reference("llama")
    _, ref1, _ = _reference("llama_bf16")
    out = np.asarray(jax.jit(teachers.teacher_apply)(teachers.teacher_params, x))
    assert out.shape == (2, *ref0["logits"].shape)
    np.testing.assert_allclose(out[0][real], ref0["logits"][real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[1][real], ref1["logits_f32"][real], atol=1e-4, rtol=0)


def test_different_families_form_a_heterogeneous_ensemble():
    teachers = load_published_teachers([ROOT / "qwen3", ROOT / "gemma3"])
    assert not teachers.stacked and len(teachers.teacher_params) == 2
    x, ref, real = _reference("qwen3")
    out = np.asarray(jax.jit(teachers.teacher_apply)(teachers.teacher_params, x))
    np.testing.assert_allclose(out[0][real], ref["logits"][real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[1][real], _reference("gemma3")[1]["logits"][real],
                               atol=1e-4, rtol=0)


# ---- the config mapping --------------------------------------------------------------


def _config(name):
    return json.loads((ROOT / name / "config.json").read_text())


def _as_transformers_4(cfg):
    """The same config in the layout transformers 4.x wrote (rope_theta, rope_scaling,
    rope_local_base_freq, sliding_window_pattern; no layer_types)."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types", None)
    if cfg["model_type"] == "gemma3_text":
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
        cfg["sliding_window_pattern"] = 2
    rope = dict(rope)
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    return cfg


@pytest.mark.parametrize("name", FLOAT32)
def test_the_transformers_4_config_layout_maps_to_the_same_config(name):
    cfg = _config(name)
    assert transformer_config(_as_transformers_4(cfg)) == transformer_config(cfg)


def _within(tree, template):
    """The part of nested dict `tree` whose keys `template` has."""
    if not isinstance(template, dict):
        return tree
    return {k: _within(tree[k], v) for k, v in template.items()}


CHANGES = {
    "llama": [dict(rope_scaling=None), dict(kv_heads=4, heads=4)],
    "qwen3": [dict(qk_norm=False)],
    "gemma": [dict(embed_scale=False), dict(activation="silu")],
    "gemma2": [dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
               dict(query_scale=None), dict(embed_scale=False), dict(norm_offset=0.0),
               dict(post_norms=False), dict(layer_types=("full_attention",) * 2)],
    "gemma3": [dict(local_rope_theta=None), dict(rope_scaling=None),
               dict(layer_types=("full_attention",) * 2)],
}


@pytest.mark.parametrize("name,change", [(n, c) for n, cs in CHANGES.items() for c in cs])
def test_each_option_changes_the_logits(name, change):
    """The fixtures exercise each option: the loaded weights run with one option changed
    are far from the reference (so the 1e-4 tests above would catch a mapping that lost it).
    """
    pre = load_pretrained(ROOT / name)
    cfg = pre.config.replace(**change)
    graphdef, params = nnx.split(pre.model, nnx.Param)
    other_def, other = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
    if "kv_heads" in change:  # each KV head repeated for its queries: GQA made MHA
        pure = nnx.to_pure_dict(params)
        for layer in pure["layers"].values():
            for key in ("k", "v"):
                layer["attn"][key]["kernel"] = jnp.repeat(layer["attn"][key]["kernel"], 2, 1)
        nnx.replace_by_pure_dict(other, pure)
    else:  # an option turned off drops its params (qk_norm's, post_norms')
        nnx.replace_by_pure_dict(other, _within(nnx.to_pure_dict(params),
                                                nnx.to_pure_dict(other)))
    x, ref, real = _reference(name)
    out = _logits(nnx.merge(other_def, other), x)
    error = np.abs(out[real] - ref["logits"][real]).max()
    if "kv_heads" in change:  # the same function written as MHA: equal, not different
        assert error < 1e-4
    else:
        assert error > 1e-2, f"{change} left the logits within {error}"


def test_llama_3_1_config_as_published():
    """Keys of Llama-3.1-8B's config.json (transformers 4.x layout)."""
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192,
                            "rope_type": "llama3"}}
    c = transformer_config(cfg)
    assert (c.kv_heads, c.head_dim, c.rope_theta, c.tie_embeddings) == (8, 128, 5e5, False)
    assert c.rope_scaling_dict["rope_type"] == "llama3"


def test_gemma3_1b_config_as_published():
    """Gemma-3-1B's layout: 5 local layers to 1 global, local base 10k, global 1M."""
    cfg = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
           "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
           "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
           "rope_local_base_freq": 10000.0, "rope_scaling": None,
           "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
           "final_logit_softcapping": None, "attn_logit_softcapping": None}
    c = transformer_config(cfg)
    assert c.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert (c.local_rope_theta, c.rope_theta, c.query_scale, c.qk_norm) == (
        1e4, 1e6, None, True)


# ---- errors ---------------------------------------------------------------------------


def _copy(tmp_path, name):
    return pathlib.Path(shutil.copytree(ROOT / name, tmp_path / name))


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_unsupported_family_names_the_key_and_value(tmp_path):
    d = _copy(tmp_path, "qwen3")
    _edit_config(d, model_type="mistral")
    with pytest.raises(ValueError, match=r"`model_type` = 'mistral' is not supported"):
        load_pretrained(d)
    with pytest.raises(ValueError, match=r"multimodal Gemma 3"):
        transformer_config({**_config("gemma3"), "model_type": "gemma3"})


@pytest.mark.parametrize("key,value,match", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     r"`rope_parameters.rope_type` = 'yarn'"),
    ("attention_bias", True, r"`attention_bias` = True"),
    ("mlp_bias", True, r"`mlp_bias` = True"),
    ("hidden_act", "gelu", r"`hidden_act` = 'gelu'"),
    ("layer_types", ["chunked_attention", "full_attention"], r"`layer_types` = "),
    ("final_logit_softcapping", 30.0, r"`final_logit_softcapping` = 30.0"),
])
def test_unsupported_option_names_the_key_and_value(key, value, match):
    with pytest.raises(ValueError, match=match):
        transformer_config({**_config("llama"), key: value})


def test_qwen_sliding_window_is_refused():
    with pytest.raises(ValueError, match=r"`use_sliding_window` = True"):
        transformer_config({**_config("qwen2"), "use_sliding_window": True})


def _rewrite_weights(directory, edit):
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    d = _copy(tmp_path, "qwen3")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = _copy(tmp_path, "qwen3")
    _rewrite_weights(d, lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(ValueError, match=r"does not use.*o_proj\.bias"):
        load_pretrained(d)


def test_mismatched_tensor_names_both_shapes(tmp_path):
    d = _copy(tmp_path, "qwen3")
    _edit_config(d, intermediate_size=48)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
                                         r"\(32, 64\) in the checkpoint, but the config needs "
                                         r"\(32, 48\)"):
        load_pretrained(d)


def test_missing_shard_file_is_named(tmp_path):
    d = _copy(tmp_path, "llama")
    (d / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00006\.safetensors"):
        load_pretrained(d)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from tokenizers import Tokenizer

    d = _copy(tmp_path, "gemma2")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save(str(d / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"ids up to 257.*vocab_size=256"):
        load_pretrained(d)
    assert load_pretrained(d, tokenizer=False).tokenizer is None


def test_missing_tokenizer_is_named(tmp_path):
    d = _copy(tmp_path, "gemma2")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_pretrained(d)


def test_teachers_with_different_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer

    d = _copy(tmp_path, "qwen3")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    before = tokenizer_fingerprint(tok)
    spec = json.loads(tok.to_str())
    spec["normalizer"] = {"type": "Lowercase"}  # same vocabulary, another tokenization
    (d / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_fingerprint(Tokenizer.from_file(str(d / "tokenizer.json"))) != before
    with pytest.raises(ValueError, match=r"different tokenizers"):
        load_published_teachers([ROOT / "llama", d])


def test_fingerprint_ignores_the_json_formatting(tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "llama" / "tokenizer.json"))
    tok.save(str(tmp_path / "compact.json"), pretty=False)
    again = Tokenizer.from_file(str(tmp_path / "compact.json"))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
