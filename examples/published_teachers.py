"""Distil published language models (Hugging Face checkpoints) into a small student.

    python examples/published_teachers.py CKPT_DIR [CKPT_DIR ...] --text FILE_OR_DIR [...]
    python examples/published_teachers.py --quick      # the repository's tiny fixtures

Each CKPT_DIR is a checkpoint directory as published (`config.json`, `*.safetensors`,
`tokenizer.json`) of a supported family (docs/published_teachers.md): Llama, Qwen2, Qwen3,
Gemma 2 or Gemma 3 text models. All must share one tokenizer. Checkpoints of one family and
size are stacked into one ensemble, others run side by side
(`mtkd_jax.teachers.load_published_teachers`).

The text is the user's own: `.txt` files (or folders of them), one document per file, read
as UTF-8 here with plain Python, tokenized with the teachers' tokenizer, joined with its
end-of-text token when it has one, and cut into rows of `--length` + 1 tokens (the last
tenth held out). The student is the library's transformer at a small size, trained with the
chunked token-level distillation step (`make_distill_step` with `student_head`) against the
teachers run online on each batch. Printed: the held-out cross-entropy of each teacher,
of their mean ensemble and of the student before and after, and its agreement with the
ensemble's next-token argmax.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtkd_jax.models.zoo.token import token_model_fns
from mtkd_jax.models.transformer import Transformer, TransformerConfig
from mtkd_jax.training.state import init_train_state
from mtkd_jax.training.steps import make_distill_step
from mtkd_jax.teachers import load_published_teachers

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "checkpoints"
QUICK = dict(paths=[FIXTURES / "llama", FIXTURES / "llama_bf16"],
             text=[FIXTURES / "corpus.txt"], steps=20, length=16, batch_size=8)
END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def read_texts(paths) -> list[str]:
    """The `.txt` files named or found under the folders named, one document each."""
    files = []
    for p in map(pathlib.Path, paths):
        files.extend(sorted(p.rglob("*.txt")) if p.is_dir() else [p])
    if not files:
        raise ValueError(f"no .txt files in {[str(p) for p in paths]}.")
    return [f.read_text(encoding="utf-8") for f in files]


def token_rows(tokenizer, texts, length: int) -> np.ndarray:
    """Documents tokenized, joined with the end-of-text token, cut into `[N, length + 1]`."""
    end = next((tokenizer.token_to_id(t) for t in END_TOKENS
                if tokenizer.token_to_id(t) is not None), None)
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text).ids + ([] if end is None else [end]))
    n = len(ids) // (length + 1)
    if n < 2:
        raise ValueError(f"the text gives {len(ids)} tokens: too few for rows of {length + 1}.")
    return np.asarray(ids[: n * (length + 1)], np.int32).reshape(n, length + 1)


def cross_entropy(logits, y) -> float:
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    return float(-jnp.take_along_axis(logp, jnp.asarray(y)[..., None], -1).mean())


def main(paths=None, text=None, *, steps: int = 300, length: int = 64, batch_size: int = 16,
         dim: int = 64, depth: int = 2, seed: int = 0, quick: bool = False) -> dict:
    start = time.perf_counter()
    if quick:
        paths, text = QUICK["paths"], QUICK["text"]
        steps, length, batch_size = QUICK["steps"], QUICK["length"], QUICK["batch_size"]
    teachers = load_published_teachers(paths, dtype="float32")
    vocab = teachers.pretrained[0].config.vocab_size
    rows = token_rows(teachers.tokenizer, read_texts(text), length)
    order = np.random.default_rng(seed).permutation(len(rows))
    held = max(1, len(rows) // 10)
    test, train = rows[order[:held]], rows[order[held:]]

    config = TransformerConfig(vocab_size=vocab, dim=dim, depth=depth, heads=4, kv_heads=2,
                               mlp_dim=2 * dim, max_len=length)
    fns, params = token_model_fns(Transformer(config, rngs=nnx.Rngs(seed)))
    tx = optax.adam(3e-3)
    step = jax.jit(make_distill_step(fns.features, teachers.teacher_apply, tx,
                                     student_head=fns.head, chunk_size=16, temperature=1.0))
    run_teachers = jax.jit(teachers.teacher_apply)
    student_logits = jax.jit(fns.logits)

    x_test, y_test = test[:, :-1], test[:, 1:]
    t_logits = np.asarray(run_teachers(teachers.teacher_params, x_test))  # [K, N, L, V]
    mean_probs = jax.nn.softmax(t_logits, -1).mean(0)
    out = {f"teacher_{n}": cross_entropy(t, y_test) for n, t in zip(teachers.names, t_logits,
                                                                      strict=True)}
    out["ensemble"] = float(-jnp.log(jnp.take_along_axis(
        mean_probs, jnp.asarray(y_test)[..., None], -1)).mean())
    out["student_before"] = cross_entropy(student_logits(params, x_test), y_test)

    state = init_train_state(params, tx)
    rng = np.random.default_rng(seed + 1)
    losses = []
    for i in range(steps):
        pick = train[rng.integers(0, len(train), batch_size)]
        batch = {"x": pick[:, :-1], "y": pick[:, 1:], "mask": np.ones_like(pick[:, 1:])}
        state, metrics = step(state, batch, jax.random.key(i),
                              teacher_params=teachers.teacher_params)
        losses.append(float(metrics["soft_loss"]))
    s_logits = student_logits(state.params, x_test)
    out["student_after"] = cross_entropy(s_logits, y_test)
    out["agreement"] = float((np.asarray(s_logits).argmax(-1)
                              == np.asarray(mean_probs).argmax(-1)).mean())
    out["soft_loss_first"], out["soft_loss_last"] = losses[0], float(np.mean(losses[-5:]))
    out["stacked"] = teachers.stacked
    out["seconds"] = time.perf_counter() - start
    for name, value in out.items():
        print(f"{name:>20}: {value:.4f}" if isinstance(value, float) else
              f"{name:>20}: {value}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="checkpoint directories")
    parser.add_argument("--text", nargs="+", help=".txt files or folders of them")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="the tiny fixtures, 20 steps")
    args = parser.parse_args()
    if not args.quick and (not args.paths or not args.text):
        parser.error("give checkpoint directories and --text, or --quick")
    main(args.paths, args.text, steps=args.steps, length=args.length,
         batch_size=args.batch_size, dim=args.dim, quick=args.quick)
