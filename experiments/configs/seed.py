"""The default run (the README's command): the article's pipeline on MNIST-1D, 3 seeds.

Command:
    python experiments/seed.py
    # the same as: python experiments/seed.py --config experiments/configs/seed.py

What it does: 3 CNN1D teachers (99k params each, one vmapped program, 20 epochs) ->
their validation predictions -> pairwise divergences (squared, euclidean, KL, JS) ->
targets (mean, performance-weighted, confidence, entropy, agreement, leave-one-out) ->
an MLP(256, 256) student (79k params) distilled with each (KL at T = 1, and the article's
MSE), on the 3600 labeled train examples plus 40000 unlabeled MNIST-1D inputs labeled only
by the teachers -> codistillation of the 3 teachers (the article's worked project) ->
test metrics, over seeds 0, 1, 2. Outputs in runs/seed/.

Measured 2026-12-02 on the idle 2-CPU x86_64 machine of this project, JAX 0.10.2 on CPU:
361 s wall (`/usr/bin/time`; 348 s inside the run), 9.6 min of CPU time, peak RSS 1.1 GB.
Where the time went (wall, 3 seeds): students 165 s (4 stacked trainings per seed instead
of 9 one by one), teachers 76 s, codistillation 46 s, data 34 s (33 s of it generating the
40000 transfer inputs, single-threaded in the mnist1d package), teacher logits and targets
15 s, analysis 8 s, compression 3 s; 44 s of it compiling, paid once for the 3 seeds.
Test accuracy %, mean ± std over 3 seeds (docs/results/):

    teachers 94.2 ± 0.3 each, their ensemble 96.2 ± 0.1
    student alone                        65.4 ± 1.1   (the MNIST-1D paper's MLP: 68)
    student, best single teacher         88.7 ± 0.4
    student, 3 teachers: mean            89.4 ± 0.5   mean, MSE   88.8 ± 0.4
                         scores          89.0 ± 0.9   confidence  89.1 ± 0.8
                         entropy         89.1 ± 0.5   agreement   89.2 ± 0.9
    student, mean, no transfer set       67.1 ± 0.9
    codistilled teachers 95.2 ± 0.1 each (+1.0 ± 0.3), their ensemble 96.6 ± 0.2

Every multi-teacher student beats the student alone by 23-24 points (paired spread <= 1.3);
against the best single teacher the gain is 0.1-0.8 points, within the seed noise (the
previous version's run, one row at a time, gave the same table within 0.8 points). The
transfer set is what makes distillation pay: without it the gain is 1.7 ± 0.4 points.
The student has 3.8x fewer parameters and 18.5x fewer FLOPs than the ensemble.
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/seed"
    return config
