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

Measured 2026-12-02 on the 2-CPU x86_64 machine of this project, JAX 0.10.2 on CPU, while
the machine was shared with other jobs (load average 10-16): 31.5 min wall but 11.4 min of
CPU time (11.1 user + 0.3 sys), against 6.6 min CPU for one seed of the previous version
(which took 393 s wall for 3 seeds at a load of 1-3); on an idle 2-CPU machine this suggests
about 4-5 minutes. Where the time went (CPU seconds, 3 seeds): students 327 (4 stacked
trainings per seed instead of 9 one by one), teachers 154, codistillation 100, data 39 (the
40000 transfer inputs), teacher logits and targets 31, analysis 13, compression 5; compiling
is paid once for the 3 seeds. Test accuracy %, mean ± std over 3 seeds (docs/results/):

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
