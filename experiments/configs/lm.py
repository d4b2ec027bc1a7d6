"""Language models on real text: one transformer teacher per domain -> one student, 3 seeds.

Command:
    mtkd lm                      # or: python experiments/lm.py
    mtkd lm --quick              # the same experiment at test size
    mtkd lm --config.seeds=1 --config.output_dir=/tmp/lm

What it does: three domains of real text that ship with the install (Python standard-library
code, Python documentation prose, Shakespeare's plays), a byte-level BPE tokenizer of 8192
tokens trained on their training splits, rows of 128 tokens with documents packed and masked
apart. One `small` transformer teacher per domain, trained on its own domain only (once,
shared by the seeds); per seed a `tiny` student on a fixed sample of the mixture: alone, from
the best single teacher, and from all teachers with each weighting, once from a cache of
each teacher's top-64 plus 64 slots sampled from the rest and once with online teachers.
The work is in `mtkd_jax.experiment.lm`; the measured table is in docs/results/lm.md.
"""

from mtkd_jax.experiment.lm import lm_config


def get_config():
    return lm_config()
