"""Language models, teachers with their own tokenizers -> one student with its own, 3 seeds.

Command:
    mtkd lm experiments/configs/lm_xtok.py            # or: mtkd lm --config.tokenizers=own
    mtkd lm experiments/configs/lm_xtok.py --quick    # the same experiment at test size
    mtkd lm experiments/configs/lm_xtok.py --config.seeds=1 --config.output_dir=/tmp/xtok

What it does: the three domains of `mtkd lm` (Python code, Python documentation, Shakespeare).
Each teacher has its own byte-level BPE tokenizer, trained on its own domain (4096, 6144 and
8192 tokens), and reads rows of 192 of its tokens; the student has another one (8192 tokens,
trained on the mixture) and rows of 128 tokens. The same teachers' architecture is also
trained with the student's tokenizer, the shared-tokenizer reference. Teachers are trained
once and shared by the seeds. Per seed, a `tiny` student on the same transfer rows: alone,
from the shared-tokenizer teachers, and from the own-tokenizer teachers aligned by byte
offsets with the `prefix` and the `uld` projection (`confidence` weighting). Reported: test
bits per byte (mean ± std over seeds), the fraction of the shared row's gain over alone each
row keeps (goal: >= 80% with the best method), each teacher's availability and the aligned
steps' time relative to the shared step. About 30 minutes on a 2-core CPU; the work is in
`mtkd_jax.experiment.lm_xtok`; the measured table is in docs/results/lm.md.
"""

from mtkd_jax.experiment.lm import lm_config


def get_config():
    c = lm_config()
    c.tokenizers = "own"
    c.output_dir = "runs/lm_xtok"
    c.own_tokenizers.teacher_len = 192  # 1.5 x the student's rows (smaller vocabularies)
    # About 30 minutes on a 2-core CPU (estimated from `mtkd lm`'s measured step times:
    # 6 teachers x 160 updates, 3 seeds x 4 students x 100 updates, data and compiling).
    c.alpha = 0.5  # the measured table's (`mtkd lm`'s default is 0.1 since)
    c.teachers.update(dict(steps=160, batch_size=16))
    c.student.update(dict(steps=100, batch_size=8, transfer_rows=800))
    return c
