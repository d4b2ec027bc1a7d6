"""Token-level multi-teacher distillation on the procedural token source, 3 seeds.

Command:
    python experiments/sequence.py
    # the same as: python experiments/sequence.py --config experiments/configs/sequence.py

What it does: per seed, 3000 train / 300 validation / 1000 test sequences of 8-32 tokens
from a second-order Markov source over 32 tokens (`mtkd_jax.data.text`, the source fixed,
the samples per seed); 3 causal convolutional token teachers of widths 64, 48, 32
(`mtkd_jax.models.zoo.token`) trained on token cross-entropy; their top-8 log-probabilities per
token cached once (with the vocabulary fingerprint); a width-16 student trained alone, from
the best single teacher (validation perplexity), and from all 3 teachers (mean, confidence
and entropy weights, per token), with the chunked loss (chunk 8 positions), KL at T = 1
mixed with CE (alpha 0.5). Outputs in runs/sequence/ (results.md, results.json, PNGs,
TensorBoard events). The measured table is in docs/results/sequence.md.

Expected (measured 2026-12-02, 559 s wall on the shared 2-CPU machine at load ~12): test
perplexity per valid token, mean ± std over 3 seeds: teachers 5.18 / 5.97 / 7.92, ensemble
5.47; student alone 16.77 ± 0.25, from the best single teacher 16.10 ± 0.28, from 3
teachers: mean 16.05 ± 0.28, confidence 16.06 ± 0.28, entropy 16.05 ± 0.29. Every distilled
student beats the student alone on every seed (-0.72); several teachers beat the best
single one on 3/3 seeds but only by 0.04-0.05.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.output_dir = "runs/sequence"
    c.seeds = 3
    c.batch_size = 32
    c.learning_rate = 3e-3
    c.teacher_epochs = 6
    c.student_epochs = 3
    c.temperature = 1.0
    c.alpha = 0.5
    c.chunk_size = 8
    c.cache_top_k = 8
    c.weightings = ("uniform", "confidence", "entropy")
    c.data = ml_collections.ConfigDict(dict(
        vocab_size=32, branching=4, source_seed=0, max_len=32, min_len=8,
        num_train=3000, num_val=300, num_test=1000,
    ))
    c.teachers = ml_collections.ConfigDict(dict(
        dims=(64, 48, 32), depths=(2, 2, 2), contexts=(3, 3, 3),
    ))
    c.student = ml_collections.ConfigDict(dict(dim=16, depth=1, context=3))
    return c
