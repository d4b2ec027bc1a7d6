"""Language models on real text: one transformer teacher per domain -> one student.

Command:
    mtkd lm                                   # this config
    mtkd lm --config.seeds=1 --config.output_dir=/tmp/lm

What it does: three domains of real text that ship with the install (Python standard
library code, Python documentation prose, Shakespeare's plays), a byte-level BPE tokenizer
of 8192 tokens trained on their training splits, rows of 128 tokens with documents packed
and masked apart. One `small` transformer teacher per domain (trained once, shared by the
seeds), then per seed a `tiny` student on a fixed sample of the mixture: alone, from the
best single teacher, and from all teachers with each weighting (top-32 cache), plus the
router (`posterior`) with online teachers. See `mtkd_jax.experiment.lm`; results in
docs/results/lm.md.

`get_config("quick")` is the same experiment at a size for tests (seconds).
"""

import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/lm"
    c.seeds = 3
    c.progress = True
    c.checkpoints = True
    c.save_every = 200
    c.log_every = 20
    c.evals_per_training = 6
    c.eval_batch_size = 32
    c.val_rows = 96  # validation rows (per domain for a teacher; in all for the mixture)
    c.test_rows = 256  # test rows per domain, at most
    c.temperature = 1.0
    c.alpha = 0.5
    c.chunk_size = 32
    c.cache_top_k = 32
    c.weightings = ("uniform", "confidence", "entropy", "posterior")
    c.weighting_kwargs = ml_collections.ConfigDict({"posterior": {"sharpness": 1.0}})
    c.online_weighting = "posterior"  # also trained with online teachers ("" for none)
    c.data = ml_collections.ConfigDict(dict(
        domains=("python_code", "python_docs", "shakespeare"), vocab_size=8192, seq_len=128,
        max_documents=0))  # 0: every document; n: at most n per split of each domain
    c.teachers = ml_collections.ConfigDict(dict(
        size="small", overrides={}, steps=300, batch_size=32, learning_rate=3e-3,
        warmup_steps=100, weight_decay=0.01))
    c.student = ml_collections.ConfigDict(dict(
        size="tiny", overrides={}, steps=120, batch_size=16, transfer_rows=1920,
        learning_rate=3e-3, warmup_steps=12, weight_decay=0.01))
    if variant == "quick":
        c.output_dir = "runs/lm_quick"
        c.seeds = 1
        c.progress = False
        c.weightings = ("uniform", "posterior")
        c.val_rows = 12
        c.test_rows = 8
        c.eval_batch_size = 8
        c.cache_top_k = 8
        c.chunk_size = 16
        c.data.seq_len = 32
        c.data.vocab_size = 512
        c.data.max_documents = 40
        c.teachers.update(size="tiny", overrides={"dim": 32, "mlp_dim": 64}, steps=6,
                          batch_size=8, warmup_steps=2)
        c.student.update(overrides={"dim": 16, "heads": 2, "kv_heads": 1, "mlp_dim": 32},
                         steps=4, batch_size=8, transfer_rows=32, warmup_steps=1)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; known: 'quick'")
    return c
