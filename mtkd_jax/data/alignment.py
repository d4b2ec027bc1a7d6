r"""Cross-tokenizer alignment by byte offsets: where a teacher and the student can be compared.

A causal LM's output at position i is its distribution over the next token given the text up
to the **end of input token i**. A teacher with another tokenizer can therefore speak at a
student position exactly when one of its own input tokens ends at the same byte of the same
text: both then predict what follows the same byte prefix (the tokens they predict may have
different lengths; `mtkd_jax.core.vocab_projection` carries the teacher's distribution onto
the student's vocabulary). Student positions where no teacher token ends at that byte are
**masked for that teacher** (availability 0): the fused target there is taken over the
teachers that can speak, and a position no teacher can speak at has soft loss 0 (it is
still counted in the soft mean; `mtkd_jax.objective.targets.distill_targets(available=)`).

Host side, NumPy only:

* `byte_ends(text, offsets) -> int64 [n]`: the UTF-8 byte at which each token ends, from the
  tokenizer's character offset mapping (`tokenizers` gives character offsets). A token that
  ends inside a multi-byte character (byte-level tokenizers split characters) gets its
  exact byte from the tokens' byte lengths where they are known (`TextTokenizer`), -1
  (never aligned) where they are not. Offsets that do not cover the text (a gap, an overlap
  other than a split character, not starting at 0 or not ending at the text's end) are an
  error.
* `encode_with_ends(tokenizer, texts)`: token ids and byte ends per text, from a
  `TextTokenizer` or a `tokenizers.Tokenizer` (a tokenizer without offset mappings is an
  error).
* `align_ends(teacher_ends, student_ends) -> (index [n_s], mask [n_s])`: for every student
  token the teacher token ending at the same byte (index 0 and mask 0 where there is none).
* `pack_aligned(texts, student, teachers, seq_len=, teacher_len=)`: the student's packed
  rows (`mtkd_jax.data.packing.pack_documents`, unchanged) and, teacher axis first, each
  teacher's rows of the same text (`teacher_tokens`, `teacher_segment_ids`,
  `teacher_positions` `[K, N, L_t]`) with the alignment of every student position
  (`teacher_index` int32 `[K, N, L]` into the teacher row, `teacher_available` float32
  `[K, N, L]`), ready to gather inside `jax.jit`
  (`mtkd_jax.objective.cross_tokenizer.aligned_teacher_logits`).

The vocabulary map between two tokenizers is built here too (`build_projection`), from the
tokens' byte strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtkd_jax.core.vocab_projection import VocabProjection
from mtkd_jax.data.packing import pack_documents
from mtkd_jax.data.tokenizer import TextTokenizer

__all__ = ["align_ends", "build_projection", "byte_ends", "encode_with_ends",
           "pack_aligned", "token_byte_strings"]


def _char_byte_starts(text: str) -> np.ndarray:
    """int64 `[len(text) + 1]`: the UTF-8 byte offset of every character boundary."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    nbytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(nbytes)])


def byte_ends(text: str, offsets, token_bytes=None) -> np.ndarray:
    """The UTF-8 byte at which each token of `text` ends (-1: inside a character, unknown).

    Args:
      text: the text that was tokenized.
      offsets: `[n, 2]` character offsets `(start, end)` of the n tokens, in order (the
        `offsets` of a `tokenizers.Encoding`).
      token_bytes: optional int `[n]`, the bytes each token stands for (byte-level
        tokenizers: `TextTokenizer.token_bytes[ids]`). Then a token that ends inside a
        multi-byte character gets its exact byte end too (checked against the offsets).

    Returns:
      int64 `[n]`, strictly increasing over the entries that are not -1.

    Raises:
      ValueError: offsets that do not cover the text exactly, or byte lengths that do not
        agree with them.

    Example:
      >>> byte_ends("aé b", [(0, 1), (1, 2), (1, 2), (2, 4)]).tolist()   # é split in 2 bytes
      [1, -1, 3, 5]
      >>> byte_ends("aé b", [(0, 1), (1, 2), (1, 2), (2, 4)], [1, 1, 1, 2]).tolist()
      [1, 2, 3, 5]
    """
    off = np.asarray(offsets, np.int64).reshape(-1, 2) if len(offsets) else np.zeros((0, 2),
                                                                                        np.int64)
    n = len(text)
    if off.shape[0] == 0:
        if n:
            raise ValueError(f"`offsets` are empty but the text has {n} characters: the "
                             "offsets must cover the text.")
        return np.zeros(0, np.int64)
    start, end = off[:, 0], off[:, 1]
    bad = None
    if start[0] != 0 or end[-1] != n:
        bad = (f"they span characters [{start[0]}, {end[-1]}) but the text has {n} (a "
               "tokenizer that strips or normalizes text cannot be aligned by offsets)")
    elif np.any(end <= start):
        i = int(np.argmax(end <= start))
        bad = f"token {i} is empty or reversed: {tuple(off[i])}"
    elif np.any(start[1:] > end[:-1]):
        i = int(np.argmax(start[1:] > end[:-1]))
        bad = (f"characters [{end[i]}, {start[i + 1]}) between tokens {i} and {i + 1} belong "
               "to no token")
    elif np.any(np.diff(start) < 0) or np.any(np.diff(end) < 0):
        bad = "the tokens are not in text order"
    if bad is not None:
        raise ValueError(f"`offsets` do not cover the text: {bad}.")
    chars = _char_byte_starts(text)
    ends = chars[end]
    inside = np.zeros(len(end), bool)
    inside[:-1] = start[1:] < end[:-1]  # the next token starts before this one ends
    if token_bytes is None:
        return np.where(inside, -1, ends)
    exact = np.cumsum(np.asarray(token_bytes, np.int64))
    if exact.shape != ends.shape or np.any((exact != ends) & ~inside):
        raise ValueError("`token_bytes` do not agree with the offsets: the tokens' byte "
                         "lengths must add up to each token's end.")
    return exact


def encode_with_ends(tokenizer, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int32 `[n]`) and byte ends (int64 `[n]`, `byte_ends`) of each text.

    Args:
      tokenizer: a `TextTokenizer` or a `tokenizers.Tokenizer` (its encodings carry the
        offset mappings).
      texts: the texts.

    Raises:
      TypeError: a tokenizer whose encodings have no offset mappings.
      ValueError: offsets that do not cover a text (`byte_ends`).
    """
    tok = tokenizer.tokenizer if isinstance(tokenizer, TextTokenizer) else tokenizer
    if not hasattr(tok, "encode_batch"):
        raise TypeError(f"`tokenizer` must be a TextTokenizer or a `tokenizers.Tokenizer` "
                        f"(with offset mappings), got {type(tokenizer).__name__}.")
    out = []
    for i, e in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        offsets = getattr(e, "offsets", None)
        if offsets is None:
            raise TypeError("`tokenizer` gives no offset mappings (`Encoding.offsets`), so "
                            "its tokens cannot be aligned to another tokenizer's.")
        lengths = (tokenizer.token_bytes[np.asarray(e.ids, np.int64)]
                   if isinstance(tokenizer, TextTokenizer) else None)
        try:
            ends = byte_ends(texts[i], offsets, lengths)
        except ValueError as err:
            raise ValueError(f"text {i}: {err}") from None
        out.append((np.asarray(e.ids, np.int32), ends))
    return out


def align_ends(teacher_ends, student_ends) -> tuple[np.ndarray, np.ndarray]:
    """For every student token, the teacher token that ends at the same byte.

    Args:
      teacher_ends: int `[n_t]` byte ends of the teacher's tokens (-1: not a boundary).
      student_ends: int `[n_s]` byte ends of the student's tokens (-1: not a boundary).

    Returns:
      `(index, mask)`: int32 `[n_s]` teacher token index (0 where unaligned) and float32
      `[n_s]` 1 where aligned, 0 where no teacher token ends there.

    Example:
      >>> idx, m = align_ends([2, 5, 6], [1, 2, 4, 6])
      >>> idx.tolist(), m.tolist()
      ([0, 0, 0, 2], [0.0, 1.0, 0.0, 1.0])
    """
    te, se = np.asarray(teacher_ends, np.int64), np.asarray(student_ends, np.int64)
    where = np.flatnonzero(te >= 0)
    valid = te[where]
    if np.any(np.diff(valid) <= 0):
        raise ValueError("`teacher_ends` must increase strictly over its boundaries.")
    j = np.clip(np.searchsorted(valid, se), 0, max(len(valid) - 1, 0))
    hit = (se >= 0) & (len(valid) > 0)
    if len(valid):
        hit &= valid[j] == se
    index = np.where(hit, where[j] if len(valid) else 0, 0).astype(np.int32)
    return index, hit.astype(np.float32)


def _units(encoded):
    """Per document, the ids and byte ends of its packed unit: position 0 is the EOS that
    starts it (it ends at byte 0: nothing read yet), then each token."""
    return [(ids, np.concatenate([[0], ends])) for ids, ends in encoded]


def pack_aligned(
    texts: Sequence[str],
    student: TextTokenizer,
    teachers: Sequence[TextTokenizer],
    *,
    seq_len: int,
    teacher_len: int | None = None,
) -> dict[str, np.ndarray]:
    """The student's packed rows of `texts`, and each teacher's rows of the same text, aligned.

    The student rows are `pack_documents`' (documents joined with EOS, cut into rows of L).
    For student row r, teacher k's row holds, segment by segment (the pieces of documents in
    the row, in order), the teacher's unit positions (its EOS, then its tokens) whose end
    byte lies in the byte span the student's segment covers, with its own segment ids and
    positions; the teacher therefore sees (about) the text the student sees in that row.
    `teacher_index[k, r, i]` is the position in teacher k's row r that ends at the same byte
    of the same document as student position i; `teacher_available[k, r, i]` is 1 there and
    0 where no teacher token ends at that byte (or the teacher's row was cut at
    `teacher_len`), and on padding.

    Args:
      texts: the documents, non-empty, in packing order.
      student: the student's tokenizer.
      teachers: the K teachers' tokenizers.
      seq_len: L, the student's row length.
      teacher_len: L_t, the teachers' row length (default 2 L); teacher positions beyond it
        are cut (the student positions they align with become unavailable).

    Returns:
      the student rows (`x`, `y`, `mask`, `segment_ids`, `positions` `[N, L]`, `row_bytes`
      `[N]`) and `teacher_tokens`, `teacher_segment_ids`, `teacher_positions` int32
      `[K, N, L_t]`, `teacher_index` int32 `[K, N, L]`, `teacher_available` float32
      `[K, N, L]`.

    Raises:
      ValueError: an empty text, bad sizes, or offsets that do not cover a text.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
    teacher_len = 2 * seq_len if teacher_len is None else teacher_len
    if not isinstance(teacher_len, int) or teacher_len < 1:
        raise ValueError(f"`teacher_len` must be a positive int, got {teacher_len!r}.")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not t:
            raise ValueError(f"text {i} is empty: every document needs at least one token.")
    s_units = _units(encode_with_ends(student, texts))
    chunks = list(pack_documents([ids for ids, _ in s_units], seq_len=seq_len,
                                 eos_id=student.eos_id, pad_id=student.pad_id,
                                 token_bytes=student.token_bytes, rows_per_chunk=1 << 30))
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    n = rows["x"].shape[0]
    # The student's stream of (document, end byte) per position, laid out as pack_documents.
    doc = np.concatenate([np.full(len(e), d) for d, (_, e) in enumerate(s_units)])
    end = np.concatenate([e for _, e in s_units])
    pad = n * seq_len - doc.size
    doc = np.pad(doc, (0, pad), constant_values=-1).reshape(n, seq_len)
    end = np.pad(end, (0, pad), constant_values=-1).reshape(n, seq_len)
    k = len(teachers)
    out = {name: np.zeros((k, n, teacher_len), np.int32)
           for name in ("teacher_tokens", "teacher_segment_ids", "teacher_positions")}
    index = np.zeros((k, n, seq_len), np.int32)
    available = np.zeros((k, n, seq_len), np.float32)
    for t, tok in enumerate(teachers):
        t_units = _units(encode_with_ends(tok, texts))
        out["teacher_tokens"][t] = tok.pad_id
        for r in range(n):
            cursor = 0
            for seg, d in enumerate(dict.fromkeys(doc[r][doc[r] >= 0]), start=1):
                cols = np.flatnonzero(doc[r] == d)
                s_end = end[r, cols]
                known = s_end[s_end >= 0]
                ids, t_end = t_units[d]
                t_ids = np.concatenate([[tok.eos_id], ids])
                pick = np.flatnonzero((t_end >= known.min()) & (t_end <= known.max())) \
                    if known.size else np.zeros(0, np.int64)
                pick = pick[: max(teacher_len - cursor, 0)]
                if pick.size == 0:
                    continue
                span = slice(cursor, cursor + pick.size)
                out["teacher_tokens"][t, r, span] = t_ids[pick]
                out["teacher_segment_ids"][t, r, span] = seg
                out["teacher_positions"][t, r, span] = np.arange(pick.size)
                idx, hit = align_ends(t_end[pick], s_end)
                index[t, r, cols] = idx + cursor
                available[t, r, cols] = hit
                cursor += pick.size
    return {**rows, **out, "teacher_index": index, "teacher_available": available}


def token_byte_strings(tokenizer: TextTokenizer) -> list[bytes | None]:
    """The bytes each token stands for, by id (None for special tokens).

    Byte-level tokens spell one character per byte (GPT-2's byte-to-unicode map, the
    'Ġ' of a leading space included); SentencePiece-style '▁' stands for a space and
    ``<0xNN>`` byte-fallback tokens for the byte NN.
    """
    # GPT-2's map: printable bytes stand for themselves, the others for 256 + n in order.
    printable = [b for b in range(256)
                 if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    to_byte = {chr(b): b for b in printable}
    extra = [b for b in range(256) if b not in to_byte.values()]
    to_byte.update({chr(256 + i): b for i, b in enumerate(extra)})
    tok = tokenizer.tokenizer
    special = {a.content for a in tok.get_added_tokens_decoder().values()}
    out: list[bytes | None] = [None] * tokenizer.vocab_size
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = bytes([int(token[3:5], 16)])
        elif all(c in to_byte for c in token):
            out[i] = bytes(to_byte[c] for c in token)
        else:
            out[i] = token.replace("\u2581", " ").encode()
    return out


def build_projection(teacher: TextTokenizer, student: TextTokenizer) -> VocabProjection:
    """The sparse map from a teacher's vocabulary to the student's (`VocabProjection`).

    Tokens are compared by the bytes they stand for (`token_byte_strings`: byte-level 'Ġ',
    '▁' and byte-fallback conventions undone), so equal strings under different markers
    match. `exact[t]` is the student token with the same bytes (-1: none); `prefix[t]` the
    student token whose bytes are the longest prefix of teacher token t's (the exact one
    when there is one; -1 when none is a prefix). The special tokens map by role: the
    teacher's EOS to the student's EOS, its padding to the student's padding.
    """
    t_bytes, s_bytes = token_byte_strings(teacher), token_byte_strings(student)
    lookup = {b: i for i, b in enumerate(s_bytes) if b is not None}
    v_t = teacher.vocab_size
    exact = np.full(v_t, -1, np.int32)
    prefix = np.full(v_t, -1, np.int32)
    for t, b in enumerate(t_bytes):
        if b is None:
            continue
        exact[t] = lookup.get(b, -1)
        for cut in range(len(b), 0, -1):
            hit = lookup.get(b[:cut])
            if hit is not None:
                prefix[t] = hit
                break
    for t_id, s_id in ((teacher.eos_id, student.eos_id), (teacher.pad_id, student.pad_id)):
        exact[t_id] = prefix[t_id] = s_id
    return VocabProjection.from_maps(exact, prefix, student_vocab_size=student.vocab_size)
