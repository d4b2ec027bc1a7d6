"""Cross-tokenizer alignment by byte offsets and the vocabulary map, on hand-built tokenizers
whose tokens (and so offsets) are known."""

import numpy as np
import pytest
from helpers import STUDENT_MERGES, TEACHER_MERGES, byte_bpe

from mtkd_jax.data.alignment import (
    align_ends,
    build_projection,
    byte_ends,
    encode_with_ends,
    pack_aligned,
    token_byte_strings,
)


@pytest.fixture
def toks(tmp_path):
    return (byte_bpe(tmp_path / "teacher.json", TEACHER_MERGES),
            byte_bpe(tmp_path / "student.json", STUDENT_MERGES))


def test_byte_ends_of_known_tokenizations(toks):
    teacher, student = toks
    (t_ids, t_ends), = encode_with_ends(teacher, ["hello world"])
    (s_ids, s_ends), = encode_with_ends(student, ["hello world"])
    # teacher: hell|o|Ġwor|l|d ; student: h|e|l|lo|Ġwo|r|l|d
    assert t_ends.tolist() == [4, 5, 9, 10, 11]
    assert s_ends.tolist() == [1, 2, 3, 5, 8, 9, 10, 11]
    idx, mask = align_ends(t_ends, s_ends)
    assert mask.tolist() == [0, 0, 0, 1, 0, 1, 1, 1]
    assert idx[mask > 0].tolist() == [1, 2, 3, 4]


def test_split_characters_are_not_boundaries(toks):
    teacher, student = toks
    text = "aé😀b"  # 1 + 2 + 4 + 1 bytes
    (_, t_ends), = encode_with_ends(teacher, [text])   # é is one teacher token (Ã©)
    (_, s_ends), = encode_with_ends(student, [text])   # the student splits é and 😀 in bytes
    assert t_ends.tolist() == [1, 3, 4, 5, 6, 7, 8]   # exact bytes from the token lengths
    assert s_ends.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    idx, mask = align_ends(t_ends, s_ends)
    assert mask.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    assert idx[mask > 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # From the offsets alone a split character has no known byte end: never aligned.
    offsets = teacher.tokenizer.encode(text, add_special_tokens=False).offsets
    assert byte_ends(text, offsets).tolist() == [1, 3, -1, -1, -1, 7, 8]


def test_align_ends_matches_a_reference(rng):
    for _ in range(20):
        t = np.sort(rng.choice(np.arange(1, 60), size=rng.integers(1, 30), replace=False))
        s = np.sort(rng.choice(np.arange(1, 60), size=rng.integers(1, 30), replace=False))
        t = np.where(rng.random(t.size) < 0.1, -1, t)
        idx, mask = align_ends(t, s)
        for i, e in enumerate(s):
            hits = [j for j, te in enumerate(t) if te == e]
            assert mask[i] == (1.0 if hits else 0.0)
            if hits:
                assert idx[i] == hits[0]


@pytest.mark.parametrize("offsets, what", [
    ([(0, 2), (3, 5)], "belong to no token"),        # a gap (a stripped space)
    ([(0, 2), (2, 4)], "span characters"),            # does not reach the end
    ([(1, 2), (2, 5)], "span characters"),            # does not start at 0
    ([(0, 3), (3, 3), (3, 5)], "empty"),
])
def test_offsets_that_do_not_cover_the_text(offsets, what):
    with pytest.raises(ValueError, match=what):
        byte_ends("ab cd", offsets)


def test_a_tokenizer_without_offsets():
    class NoOffsets:
        def encode_batch(self, texts, add_special_tokens=False):
            return [type("E", (), {"ids": [1]})() for _ in texts]

    with pytest.raises(TypeError, match="offset mappings"):
        encode_with_ends(NoOffsets(), ["x"])
    with pytest.raises(TypeError, match="TextTokenizer"):
        encode_with_ends(object(), ["x"])


def test_pack_aligned_rows_point_at_the_same_bytes(toks):
    teacher, student = toks
    texts = ["hello world", "aé😀b hello", "world hello world"]
    rows = pack_aligned(texts, student, [teacher, student], seq_len=6, teacher_len=8)
    n = rows["x"].shape[0]
    assert rows["teacher_index"].shape == (2, n, 6)
    assert rows["teacher_tokens"].shape == (2, n, 8)
    # The student aligned with itself: every real position, to its own token.
    np.testing.assert_array_equal(rows["teacher_available"][1], rows["mask"])
    take = np.take_along_axis(rows["teacher_tokens"][1], rows["teacher_index"][1], axis=1)
    np.testing.assert_array_equal(np.where(rows["mask"] > 0, take, 0),
                                  np.where(rows["mask"] > 0, rows["x"], 0))
    # The teacher: the aligned teacher input token ends at the same byte of the same text:
    # decode both prefixes within the row's segment and compare their ends.
    t_bytes = token_byte_strings(teacher)
    s_bytes = token_byte_strings(student)
    a = rows["teacher_available"][0]
    assert 0 < a.sum() < rows["mask"].sum()
    for r in range(n):
        for i in np.flatnonzero(a[r]):
            j = rows["teacher_index"][0, r, i]
            seg_s = rows["segment_ids"][r] == rows["segment_ids"][r, i]
            seg_t = rows["teacher_segment_ids"][0, r] == rows["teacher_segment_ids"][0, r, j]
            s_text = b"".join(s_bytes[t] or b"" for t in rows["x"][r][seg_s][: i - np.argmax(
                seg_s) + 1])
            t_text = b"".join(t_bytes[t] or b"" for t in rows["teacher_tokens"][0, r][seg_t][
                : j - np.argmax(seg_t) + 1])
            assert s_text.endswith(t_text) or t_text.endswith(s_text), (r, i, s_text, t_text)
    assert not np.any(a * (1 - rows["mask"]))  # padding is never available


def test_pack_aligned_cuts_long_teacher_rows(toks):
    teacher, student = toks
    rows = pack_aligned(["hello world hello world"], student, [student], seq_len=16,
                        teacher_len=4)
    # Each teacher row keeps its first 4 positions; the rest of the row is cut: unaligned.
    want = np.minimum(rows["mask"].sum(1), 4)
    np.testing.assert_array_equal(rows["teacher_available"][0].sum(1), want)
    np.testing.assert_array_equal(rows["teacher_available"][0][:, :4], rows["mask"][:, :4])
    with pytest.raises(ValueError, match="empty"):
        pack_aligned(["ok", ""], student, [teacher], seq_len=4)


def test_projection_by_bytes(toks):
    teacher, student = toks
    proj = build_projection(teacher, student)
    t_bytes, s_bytes = token_byte_strings(teacher), token_byte_strings(student)
    assert proj.teacher_vocab_size == teacher.vocab_size
    assert proj.student_vocab_size == student.vocab_size
    vocab = teacher.tokenizer.get_vocab()
    svocab = student.tokenizer.get_vocab()
    # 'Ġw' is in both: an exact match, and its bytes are b" w".
    assert t_bytes[vocab["Ġw"]] == b" w"
    assert proj.exact[vocab["Ġw"]] == svocab["Ġw"]
    # 'hell' is not in the student: no exact match, prefix 'h'; 'Ġwor' -> 'Ġwo'.
    assert proj.exact[vocab["hell"]] == -1
    assert proj.prefix[vocab["hell"]] == svocab["h"]
    assert proj.prefix[vocab["Ġwor"]] == svocab["Ġwo"]
    # Reference: every non-special teacher token.
    for t, b in enumerate(t_bytes):
        if b is None:
            continue
        matches = [s for s, sb in enumerate(s_bytes) if sb == b]
        assert proj.exact[t] == (matches[0] if matches else -1)
        pre = max((s for s, sb in enumerate(s_bytes) if sb and b.startswith(sb)),
                  key=lambda s: len(s_bytes[s]))
        assert proj.prefix[t] == pre
    assert proj.exact[teacher.eos_id] == student.eos_id
    assert proj.student_matched[svocab["Ġw"]] and not proj.student_matched[svocab["Ġwo"]]
