"""Procedural token sequences for offline sequence distillation, deterministic by seed.

A small random **second-order Markov source** over a vocabulary of a few dozen tokens: every
context (previous two tokens) has a few likely next tokens (a sparse Dirichlet row), so a
causal model with a context of two or more tokens can learn it and its entropy floor is
known (`TextSource.entropy_rate`). Sequences start with BOS, have ragged lengths (uniform in
`[min_len, max_len]`), end with EOS and are padded with PAD. Nothing is downloaded.

A split is the next-token task: inputs `x` `[N, L]` (tokens 0..L-1), labels `y` `[N, L]`
(tokens 1..L), `mask` `[N, L]` (1 where `y` is a real token, 0 on padding). `batches`
yields the batch layout of `mtkd_jax.training.batch` for sequences, with `"index"` for a teacher
cache. `vocab_fingerprint` identifies the tokenization (checked by a sequence cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["PAD", "BOS", "EOS", "TextSource", "TokenSplit", "make_source", "sample_split",
           "vocab_fingerprint", "batches"]

PAD, BOS, EOS = 0, 1, 2
"""Reserved token ids: padding, beginning and end of a sequence."""


@dataclasses.dataclass(frozen=True, eq=False)
class TextSource:
    """A second-order Markov source: `transition[a, b]` is the distribution of the token
    after `(a, b)`, `[V, V, V]`; `vocab` the token strings."""

    transition: np.ndarray
    vocab: tuple[str, ...]
    seed: int

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def entropy_rate(self) -> float:
        """Mean entropy (nats) of the next token over the contexts, uniformly weighted: a
        rough floor for a model's per-token NLL (the true one weights contexts by their
        stationary frequency)."""
        p = self.transition[2:, 2:]
        h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
        return float(np.mean(h))


def make_source(*, vocab_size: int = 32, branching: int = 4, seed: int = 0) -> TextSource:
    """A random source over `vocab_size` tokens (3 reserved), `branching` possible next
    tokens per context (EOS comes at a sequence's sampled length, `sample_split`).

    Example:
      >>> from mtkd_jax.data.text import make_source
      >>> s = make_source(vocab_size=16, seed=0)
      >>> s.transition.shape, round(float(s.transition[5, 7].sum()), 6)
      ((16, 16, 16), 1.0)
    """
    if not isinstance(vocab_size, int) or vocab_size < 5:
        raise ValueError(f"`vocab_size` must be an int >= 5 (3 are reserved), got {vocab_size}.")
    words = vocab_size - 3
    if not isinstance(branching, int) or not 1 <= branching <= words:
        raise ValueError(f"`branching` must be an int in [1, {words}], got {branching}.")
    rng = np.random.default_rng(seed)
    t = np.zeros((vocab_size, vocab_size, vocab_size))
    for a in range(vocab_size):
        for b in range(vocab_size):
            nxt = 3 + rng.choice(words, size=branching, replace=False)
            t[a, b, nxt] = rng.dirichlet(np.full(branching, 0.7))
    vocab = ("<pad>", "<bos>", "<eos>") + tuple(f"w{i:02d}" for i in range(words))
    return TextSource(transition=t, vocab=vocab, seed=seed)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenSplit:
    """`x`, `y` int32 `[N, L]` and `mask` float32 `[N, L]`; `len(split) == N`."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return self.x.shape[0]


def sample_split(
    source: TextSource, num: int, *, max_len: int = 32, min_len: int = 8, seed: int = 0
) -> TokenSplit:
    """`num` sequences from `source`, deterministic by `seed`, padded to `max_len` tokens.

    A sequence is BOS, then `length - 1` tokens drawn from the source, then EOS, with
    `length` uniform in `[min_len, max_len]`; the model predicts every token after BOS, EOS
    included, so `mask` counts `length` positions.

    Example:
      >>> from mtkd_jax.data.text import make_source, sample_split
      >>> s = sample_split(make_source(vocab_size=16), 4, max_len=10, min_len=3, seed=1)
      >>> s.x.shape, bool(s.mask.sum(axis=1).min() >= 3)
      ((4, 10), True)
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"`num` must be an int >= 1, got {num!r}.")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}.")
    rng = np.random.default_rng([source.seed, seed])
    tokens = np.full((num, max_len + 1), PAD, np.int32)
    mask = np.zeros((num, max_len), np.float32)
    cum = np.cumsum(source.transition, axis=-1)
    lengths = rng.integers(min_len, max_len + 1, size=num)
    tokens[:, 0] = BOS
    prev = np.full(num, BOS)
    cur = np.full(num, BOS)
    alive = np.ones(num, bool)
    for i in range(1, max_len + 1):
        u = rng.random(num)
        nxt = np.minimum((u[:, None] > cum[prev, cur]).sum(-1), source.vocab_size - 1)
        nxt = np.where(i == lengths, EOS, nxt)  # the sampled length ends the sequence
        tokens[:, i] = np.where(alive, nxt, PAD)
        mask[:, i - 1] = alive
        alive = alive & (nxt != EOS)
        prev, cur = cur, nxt
    return TokenSplit(x=tokens[:, :-1], y=tokens[:, 1:], mask=mask)


def vocab_fingerprint(vocab: Sequence[str]) -> str:
    """sha256 of a vocabulary (the token strings in id order): the tokenization's identity.

    Example:
      >>> from mtkd_jax.data.text import vocab_fingerprint
      >>> vocab_fingerprint(["a", "b"]) == vocab_fingerprint(["b", "a"])
      False
    """
    h = hashlib.sha256()
    for token in vocab:
        h.update(token.encode() + b"\x00")
    return h.hexdigest()


def batches(
    split: TokenSplit, *, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[dict]:
    """Batches `{"x", "y", "mask", "index"}` of a split, shuffled by `(seed, epoch)`.

    Example:
      >>> from mtkd_jax.data.text import batches, make_source, sample_split
      >>> s = sample_split(make_source(vocab_size=16), 5, max_len=6, min_len=2)
      >>> [b["x"].shape for b in batches(s, batch_size=2, drop_remainder=False)]
      [(2, 6), (2, 6), (1, 6)]
    """
    n = len(split)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {"x": split.x[idx], "y": split.y[idx], "mask": split.mask[idx], "index": idx}
