"""A real subword tokenizer: byte-level BPE trained offline with the `tokenizers` library.

`train_tokenizer` learns a byte-level BPE vocabulary (`vocab_size` ids, default 8192) on the
training split of the given domains; `load_tokenizer` reads a `tokenizer.json` (one trained
here or the user's own byte-level BPE file) the same way. Either returns a `TextTokenizer`:

* `encode(texts) -> list of int32 [n_i]` and `decode(ids) -> str`; byte-level, with no
  normalizer and no prefix space, so `decode(encode(t)) == t` for any text (whitespace of
  code included) and every token stands for whole bytes: `token_bytes[id]` is how many
  (0 for special tokens), which gives bits per byte from a token-level loss;
* the special tokens `<|pad|>` (id 0) and `<|eos|>` (id 1); text containing those strings
  is encoded as ordinary text, never as the special ids;
* `fingerprint`: the sha256 of the tokenizer's canonical JSON, the identity a sequence
  cache checks (`build_cache(..., tokenizer=tok.fingerprint)`,
  `open_cache(..., expect_tokenizer=tok.fingerprint)`).

`check_vocab(tokenizer, vocab_size)` refuses a model embedding of another size: token ids
outside the embedding would be clamped silently by JAX's indexing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "TextTokenizer", "check_vocab", "load_tokenizer",
           "train_tokenizer"]

PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|eos|>"
"""The special tokens of a trained tokenizer: padding (id 0) and end of document (id 1)."""


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer:
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) and what the data pipeline needs.

    Attributes:
      tokenizer: the `tokenizers.Tokenizer`.
      fingerprint: sha256 of its canonical JSON.
      pad_id, eos_id: the special ids.
      vocab_size: V, including the special tokens.
      token_bytes: int32 `[V]`, UTF-8 bytes each token stands for (0 for special tokens).
    """

    tokenizer: object
    fingerprint: str
    pad_id: int
    eos_id: int
    vocab_size: int
    token_bytes: np.ndarray

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, int32 `[n_i]` (no special tokens added)."""
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids) -> str:
        """The text of token ids (special tokens dropped)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` to `path` (a file path); `load_tokenizer` reads it back."""
        self.tokenizer.save(os.fspath(path))


def _canonical(tok) -> str:
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))


def _wrap(tok, *, pad_token: str, eos_token: str, where: str) -> TextTokenizer:
    """Check a `tokenizers.Tokenizer` is byte-level BPE with the special tokens; wrap it."""
    spec = json.loads(tok.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ValueError(
            f"{where}: only byte-level BPE tokenizers are supported (model BPE, decoder "
            f"ByteLevel), got model {model.get('type')!r} and decoder "
            f"{decoder.get('type')!r}: their tokens stand for exact bytes, which the lossless "
            "round trip and the bits-per-byte metric need."
        )
    if spec.get("normalizer") is not None:
        raise ValueError(f"{where}: the tokenizer has a normalizer, so decode(encode(text)) "
                         "would not give the text back; use one without.")
    ids = {t: tok.token_to_id(t) for t in (pad_token, eos_token)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{where}: the tokenizer has no special tokens {missing} (set "
                         "`pad_token=` / `eos_token=` to the names it uses).")
    tok.encode_special_tokens = True  # special-token strings inside text stay text
    vocab = tok.get_vocab(with_added_tokens=True)
    size = tok.get_vocab_size(with_added_tokens=True)
    special = {a["content"] for a in spec.get("added_tokens", [])}
    token_bytes = np.zeros(size, np.int32)
    for token, i in vocab.items():
        # Byte-level tokens spell one character per byte (GPT-2's byte-to-unicode map).
        token_bytes[i] = 0 if token in special else len(token)
    return TextTokenizer(tokenizer=tok, fingerprint=hashlib.sha256(_canonical(tok).encode())
                         .hexdigest(), pad_id=ids[pad_token], eos_id=ids[eos_token],
                         vocab_size=size, token_bytes=token_bytes)


def load_tokenizer(path: str | os.PathLike, *, pad_token: str = PAD_TOKEN,
                   eos_token: str = EOS_TOKEN) -> TextTokenizer:
    """Read a `tokenizer.json` (byte-level BPE with a pad and an end-of-document token).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a tokenizer file, not byte-level BPE, or without the special tokens.
    """
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No tokenizer file at {path!r}.")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a `tokenizers` tokenizer.json: {e}") from None
    return _wrap(tok, pad_token=pad_token, eos_token=eos_token, where=path)


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2,
) -> TextTokenizer:
    """Train a byte-level BPE tokenizer on `texts` (the training split's documents).

    The 256 byte tokens are always in the vocabulary, so any text can be encoded; the
    merges fill the rest up to `vocab_size` (fewer if the text has too few distinct pairs
    seen `min_frequency` times). Training is deterministic for the same texts.

    Args:
      texts: the documents to learn from (an iterable: it is consumed once).
      vocab_size: V, including the 2 special tokens and the 256 bytes; at least 259.
      min_frequency: a merge needs a pair seen this often.

    Example:
      >>> tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 50, vocab_size=300)
      >>> ids = tok.encode(["def g(y):\\n    return y\\n"])[0]
      >>> tok.decode(ids), int(tok.token_bytes[ids].sum()), tok.eos_id
      ('def g(y):\\n    return y\\n', 23, 1)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 259:
        raise ValueError(f"`vocab_size` must be an int >= 259 (256 bytes and 2 special "
                         f"tokens and a merge), got {vocab_size!r}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, where="train_tokenizer")


def check_vocab(tokenizer: TextTokenizer, vocab_size: int) -> None:
    """Raise unless a model with a `vocab_size`-row embedding fits `tokenizer` exactly.

    Example:
      >>> tok = train_tokenizer(["abc abd"] * 10, vocab_size=260)
      >>> check_vocab(tok, tok.vocab_size)
      >>> check_vocab(tok, 8192)
      Traceback (most recent call last):
      ...
      ValueError: The model's embedding has 8192 rows but the tokenizer has 260 tokens ...
    """
    if vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"The model's embedding has {vocab_size} rows but the tokenizer has "
            f"{tokenizer.vocab_size} tokens (fingerprint {tokenizer.fingerprint[:12]}): "
            "build the model with `vocab_size=tokenizer.vocab_size`, or use the tokenizer "
            "the model was trained with."
        )
