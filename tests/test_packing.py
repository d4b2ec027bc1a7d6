"""Packing documents into rows (hand-worked example and properties), the on-disk packed
splits, and `prepare_lm_data` end to end on the user's own text."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd_jax.data import corpora, packing
from mtkd_jax.data.lm_data import prepare_lm_data

EOS, PAD = 1, 0


def _pack(docs, seq_len, **kw):
    chunks = list(packing.pack_documents(docs, seq_len=seq_len, eos_id=EOS, pad_id=PAD,
                                         token_bytes=np.arange(20) % 4, **kw))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_hand_worked_example():
    rows = _pack([np.array([5, 6]), np.array([7]), np.array([8, 9, 10])], 4)
    # units: x [1 5 6] [1 7] [1 8 9 10], y [5 6 1] [7 1] [8 9 10 1]
    assert rows["x"].tolist() == [[1, 5, 6, 1], [7, 1, 8, 9], [10, 0, 0, 0]]
    assert rows["y"].tolist() == [[5, 6, 1, 7], [1, 8, 9, 10], [1, 0, 0, 0]]
    assert rows["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 2, 2, 2], [1, 0, 0, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 0, 0]]
    # bytes of the labels (token_bytes = id % 4; EOS = 1 -> 1 here, a test table)
    assert rows["row_bytes"].tolist() == [1 + 2 + 1 + 3, 1 + 0 + 1 + 2, 1]
    assert rows["mask"].dtype == np.float32 and rows["x"].dtype == np.int32


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
       seq_len=st.integers(2, 17), per_chunk=st.integers(1, 5))
def test_packing_properties(lengths, seq_len, per_chunk):
    rng = np.random.default_rng(len(lengths) * 100 + seq_len)
    docs = [rng.integers(2, 20, size=n) for n in lengths]
    rows = _pack(docs, seq_len, rows_per_chunk=per_chunk)
    assert len(rows["x"]) == packing.num_rows(lengths, seq_len=seq_len)
    assert np.all(np.diff(rows["segment_ids"], axis=1)[rows["mask"][:, 1:] > 0] >= 0)
    assert rows["mask"].sum() == sum(n + 1 for n in lengths)  # every token and its EOS
    # Chunking does not change the rows.
    np.testing.assert_array_equal(_pack(docs, seq_len, rows_per_chunk=1000)["x"], rows["x"])
    # The documents come back from the masked inputs split at EOS, in order...
    flat_x, flat_y = rows["x"][rows["mask"] > 0], rows["y"][rows["mask"] > 0]
    assert np.array_equal(flat_x[1:], flat_y[:-1])
    back = np.split(flat_y, np.flatnonzero(flat_y == EOS) + 1)[:-1]
    assert [b[:-1].tolist() for b in back] == [d.tolist() for d in docs]
    # ...and within a row a segment is a contiguous run whose positions count up by one.
    seg, pos = rows["segment_ids"], rows["positions"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1)
    assert np.all(pos[:, 1:][~same & (seg[:, 1:] > 0)] == 0) and np.all(pos[:, 0] == 0)
    starts = (rows["x"] == EOS) & (rows["mask"] > 0)
    assert np.all(pos[starts] == 0)  # a document (its EOS-as-BOS) starts at position 0


def test_empty_document_and_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="Document 1 has 0 tokens"):
        _pack([np.array([3]), np.array([], np.int32)], 4)
    with pytest.raises(ValueError, match="`seq_len` must be a positive int"):
        _pack([np.array([3])], 0)


def test_written_split_and_batches(tmp_path):
    docs = [np.arange(2, 2 + n) for n in (5, 9, 3, 12, 7)]
    token_bytes = np.where(np.arange(20) > EOS, 1, 0)  # 1 byte a token, 0 for EOS and PAD
    chunks = packing.pack_documents(docs, seq_len=6, eos_id=EOS, pad_id=PAD,
                                    token_bytes=token_bytes, rows_per_chunk=2)
    n = packing.num_rows([5, 9, 3, 12, 7], seq_len=6)
    split = packing.write_packed(tmp_path / "p", chunks, num_rows=n, seq_len=6,
                                 meta={"num_docs": 5})
    again = packing.open_packed(tmp_path / "p")
    assert (len(again), again.seq_len, again.num_tokens, again.num_docs) == (n, 6, 41, 5)
    assert again.num_bytes == 36  # the documents' tokens; the EOS labels count 0
    np.testing.assert_array_equal(again.x, split.x)
    seen = np.concatenate([b["index"] for b in packing.batches(again, batch_size=2, seed=1,
                                                               drop_remainder=False)])
    assert sorted(seen.tolist()) == list(range(n))
    b = next(packing.batches(again, batch_size=3, seed=1, epoch=2, start=1))
    np.testing.assert_array_equal(b["segment_ids"], again.segment_ids[b["index"]])
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        packing.open_packed(tmp_path)


def _user_domains(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "ünï"]
    for i in range(24):
        text = " ".join(rng.choice(words, size=rng.integers(5, 60)))
        (tmp_path / "prose" / f"{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "prose" / f"{i:02d}.txt").write_text(text + "\n")
    lines = [f"def f{i}(x):\n    return x * {i}\n" for i in range(30)]
    (tmp_path / "code.jsonl").write_text(
        "\n".join('{"src": ' + __import__("json").dumps(t) + "}" for t in lines))
    return [corpora.load_text_files(tmp_path / "prose", name="prose", test_fraction=0.2),
            corpora.load_jsonl(tmp_path / "code.jsonl", name="code", field="src")]


def test_prepare_lm_data_end_to_end(tmp_path):
    domains = _user_domains(tmp_path)
    a = prepare_lm_data(domains, seq_len=16, seed=0, vocab_size=300, data_dir=tmp_path / "a")
    assert a.domains == ("prose", "code") and a.tokenizer.vocab_size == 300
    assert a.timings["tokenizer_train"] > 0
    for d in domains:
        for s in ("train", "validation", "test"):
            p = a.packed[d.name][s]
            assert p.num_bytes == d.num_bytes(s)  # the bits-per-byte denominator, exactly
            assert p.num_docs == len(d[s]) and p.seq_len == 16
            assert p.num_tokens == int(p.mask.sum())
    mixed, domain = a.mixture("train")
    sizes = [len(a.packed[d]["train"]) for d in a.domains]
    assert np.bincount(domain).tolist() == sizes and len(mixed) == sum(sizes)
    np.testing.assert_array_equal(mixed.x[domain == 1], a.packed["code"]["train"].x)
    assert mixed.num_bytes == sum(d.num_bytes("train") for d in domains)
    again = prepare_lm_data(domains, seq_len=16, seed=0, vocab_size=300,
                            data_dir=tmp_path / "a")
    assert again.timings["tokenizer_train"] == again.timings["tokenize"] == 0.0
    other_dir = prepare_lm_data(domains, seq_len=16, seed=0, vocab_size=300,
                                data_dir=tmp_path / "b")
    assert other_dir.tokenizer.fingerprint == a.tokenizer.fingerprint
    np.testing.assert_array_equal(other_dir.packed["code"]["train"].x,
                                  a.packed["code"]["train"].x)
    seed1 = prepare_lm_data(domains, seq_len=16, seed=1, tokenizer=a.tokenizer,
                            data_dir=tmp_path / "a")
    assert not np.array_equal(seed1.packed["code"]["train"].x, a.packed["code"]["train"].x)
    np.testing.assert_array_equal(seed1.packed["code"]["test"].x, a.packed["code"]["test"].x)
    assert seed1.summary()["code"]["train"] == a.summary()["code"]["train"]
    few = prepare_lm_data(domains, seq_len=16, tokenizer=a.tokenizer, max_documents=3,
                          data_dir=tmp_path / "a")
    assert [few.packed["prose"][s].num_docs for s in ("train", "validation", "test")] == [3, 1, 3]
    with pytest.raises(ValueError, match="unique names"):
        prepare_lm_data([domains[0], domains[0]], data_dir=tmp_path / "a")


@pytest.mark.slow
def test_builtin_domains_have_half_a_million_tokens_each(tmp_path):
    """All three real domains prepared from the install (about 2 minutes): each has at least
    500k tokens with the default 8192-token tokenizer, and the bytes add up exactly."""
    data = prepare_lm_data(seq_len=256, data_dir=tmp_path)
    assert data.domains == corpora.TEXT_DOMAINS and data.tokenizer.vocab_size == 8192
    for name, splits in data.summary().items():
        assert sum(s["tokens"] for s in splits.values()) >= 500_000, (name, splits)
        assert splits["test"]["docs"] >= 30
    domain = corpora.load_domain("python_docs", data_dir=tmp_path)
    assert data.packed["python_docs"]["test"].num_bytes == domain.num_bytes("test")
    sample = domain["test"][0]
    assert data.tokenizer.decode(data.tokenizer.encode([sample])[0]) == sample
