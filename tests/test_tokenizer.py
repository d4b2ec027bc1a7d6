"""The byte-level BPE tokenizer: lossless round trip on real text, exact bytes per token,
a stable fingerprint that the sequence cache checks, the user's own tokenizer.json."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from mtkd_jax.cache import build_cache, open_cache
from mtkd_jax.data import packing
from mtkd_jax.data.builders import text_builders
from mtkd_jax.data.tokenizer import (
    EOS_TOKEN,
    check_vocab,
    load_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def samples():
    """A small slice of each real domain: (training texts, held-out texts)."""
    from pydoc_data.topics import topics

    files = text_builders.stdlib_files()
    code = [text_builders.split_docstrings(pathlib.Path(p).read_text(encoding="utf-8"))
            for rel, p in files if rel in ("abc.py", "bisect.py", "colorsys.py", "shlex.py",
                                           "textwrap.py", "tabnanny.py")]
    plays = [t for i, t in text_builders.shakespeare_documents() if i.startswith("macbeth/")]
    prose = [topics[k] for k in sorted(topics)[:12]] + ["\n\n".join(d) for _, d in code]
    train = [c for c, _ in code[:-1]] + plays[:-3] + prose[:-2]
    held = [code[-1][0], *plays[-3:], *prose[-2:],
            "\tdef f(x):  \r\n\t\treturn {'é': x}  # ünïcödé ✓ 🐍\n\n\n   ",
            f"a literal {EOS_TOKEN} and <|pad|> in the text"]
    return train, held


@pytest.fixture(scope="module")
def tok(samples):
    return train_tokenizer(samples[0], vocab_size=1024)


def test_round_trip_and_exact_bytes_on_real_text(tok, samples):
    assert tok.vocab_size == 1024 and (tok.pad_id, tok.eos_id) == (0, 1)
    for text in samples[1]:
        ids = tok.encode([text])[0]
        assert ids.dtype == np.int32 and ids.min() >= 2  # special strings stay text
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == len(text.encode())
    code = samples[1][0]
    assert len(tok.encode([code])[0]) < len(code.encode()) / 2  # real merges, not bytes


def test_fingerprint_stable_and_distinct(tok, samples, tmp_path):
    again = train_tokenizer(samples[0], vocab_size=1024)
    assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 64
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(loaded.token_bytes, tok.token_bytes)
    assert loaded.encode(samples[1][:2])[1].tolist() == tok.encode(samples[1][:2])[1].tolist()
    smaller = train_tokenizer(samples[0], vocab_size=900)
    other_text = train_tokenizer(samples[0][:3], vocab_size=1024)
    assert len({tok.fingerprint, smaller.fingerprint, other_text.fingerprint}) == 3


def test_users_tokenizer_file_is_checked(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    word = Tokenizer(models.WordLevel({"a": 0, "<|pad|>": 1, "<|eos|>": 2}, unk_token="a"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "word.json"))
    with pytest.raises(ValueError, match="only byte-level BPE tokenizers are supported"):
        load_tokenizer(tmp_path / "word.json")
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="is not a `tokenizers` tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    bpe = train_tokenizer(["hello world"] * 5, vocab_size=270)
    bpe.save(tmp_path / "bpe.json")
    with pytest.raises(ValueError, match=r"no special tokens \['<eos>'\]"):
        load_tokenizer(tmp_path / "bpe.json", eos_token="<eos>")


def test_vocab_must_match_the_embedding(tok):
    check_vocab(tok, 1024)
    with pytest.raises(ValueError, match="embedding has 1000 rows but the tokenizer has 1024"):
        check_vocab(tok, 1000)


def test_sequence_cache_refuses_another_tokenizer(tok, samples, tmp_path):
    other = train_tokenizer(samples[0], vocab_size=1000)
    docs = tok.encode(samples[1][:3])
    rows = next(packing.pack_documents(docs, seq_len=16, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                       token_bytes=tok.token_bytes))
    split = packing.PackedSplit(**rows, num_tokens=0, num_bytes=0, num_docs=3)
    table = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)

    def teachers(tp, x):  # [K, B, L, V=8] from token ids (hashed into 8 classes)
        return jnp.broadcast_to(tp[:, None, None, :] * (x % 3)[None, ..., None],
                                (2, *x.shape, 8))

    n = len(split)
    build_cache(tmp_path, teachers, table, packing.batches(split, batch_size=n),
                num_examples=n, top_k=4, tokenizer=tok.fingerprint, progress=False)
    assert open_cache(tmp_path, expect_tokenizer=tok.fingerprint).tokenizer == tok.fingerprint
    with pytest.raises(ValueError, match="another tokenization"):
        open_cache(tmp_path, expect_tokenizer=other.fingerprint)
