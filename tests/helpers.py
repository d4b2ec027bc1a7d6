"""Float64 NumPy references and random inputs shared by the numerical tests (written once).

Imported as `from helpers import ...` (pytest puts this folder on `sys.path`).
"""

import jax
import numpy as np

SHAPE = (3, 2, 4, 5)  # [K, B1, B2, C]: teacher axis first, two batch axes, classes
TOL = dict(rtol=2e-5, atol=2e-6)  # float32 results against float64 references


def np_log_softmax(z, temperature=1.0, axis=-1):
    """log softmax(z / T) over `axis`, in float64."""
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def np_softmax(z, temperature=1.0, axis=-1):
    """softmax(z / T) over `axis`, in float64."""
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def random_probs(rng, shape=SHAPE, dtype=np.float32):
    """Fresh probability vectors over the last axis (Dirichlet(1))."""
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(dtype)


def random_logits(rng, shape=SHAPE, scale=2.0):
    """Fresh float32 logits, standard normal times `scale`."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def assert_matches(fn, args, expected, *, tol=None, **kwargs):
    """`fn(*args, **kwargs)` called eagerly and under `jax.jit` has the shape of the float64
    reference `expected` and equals it to `tol` (default `TOL`)."""
    tol = TOL if tol is None else tol
    eager = fn(*args, **kwargs)
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))(*args)
    assert np.shape(eager) == np.shape(expected), (np.shape(eager), np.shape(expected))
    np.testing.assert_allclose(eager, expected, **tol)
    np.testing.assert_allclose(jitted, expected, **tol)


# Two byte-level BPE tokenizers with known tokens, for cross-tokenizer tests: the teacher
# reads "hello world" as hell|o|Ġwor|l|d, the student as h|e|l|lo|Ġwo|r|l|d.
TEACHER_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"),
                  ("Ġw", "or"), ("Ã", "©")]
STUDENT_MERGES = [("l", "o"), ("Ġ", "w"), ("Ġw", "o")]


def byte_bpe(path, merges):
    """A byte-level BPE tokenizer from explicit merges (ids: pad 0, eos 1, the 256 byte
    characters, then one token per merge), through the library's loader."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from mtkd_jax.data.tokenizer import load_tokenizer

    vocab = {"<|pad|>": 0, "<|eos|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|eos|>"])
    tok.save(str(path))
    return load_tokenizer(path)
