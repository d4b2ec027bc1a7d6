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

Measured 2026-12-02 (second session) on the idle 2-CPU x86_64 machine of this project (load
0.0 before the start), JAX 0.10.2 on CPU, fresh TFDS data dir and run folder: 199 s wall
(`/usr/bin/time`; 189 s inside the run), 5.3 min of CPU time, peak RSS 1.1 GB. Where the
time went (wall, 3 seeds): students 93 s (4 stacked trainings per seed instead of 9 one by
one), teachers 39 s, codistillation 30 s, data 11 s (8.5 s of it generating the 40000
transfer inputs, single-threaded in the mnist1d package), teacher logits and targets 9 s,
analysis 4 s, compression 2 s; 22 s of it compiling, paid once for the 3 seeds. An earlier
measurement the same day, same code, gave 361 s: the host was slower then (the same
single-threaded transfer-set generation took 33 s, 3.9x longer), so expect 3-6 minutes.
Test accuracy %, mean ± std over 3 seeds (docs/results/):

    teachers 94.2 ± 0.1 (mean of the 3), their ensemble 96.2 ± 0.3
    student alone                        65.4 ± 0.8   (the MNIST-1D paper's MLP: 68)
    student, best single teacher         88.4 ± 0.8
    student, 3 teachers: mean            89.4 ± 0.4   mean, MSE   89.7 ± 0.2
                         scores          89.4 ± 0.3   confidence  89.1 ± 0.6
                         entropy         89.0 ± 1.0   agreement   89.2 ± 0.5
    student, mean, no transfer set       66.3 ± 1.2
    codistilled teachers 95.4 ± 0.1 each (+1.1 ± 0.1), their ensemble 96.6 ± 0.1

Every multi-teacher student beats the student alone by 23.6-24.3 points (paired spread
<= 1.6); against the best single teacher the gain is 0.6-1.3 points, within the seed noise
for 4 of the 6 rows (mean +0.9 ± 0.7 and mean_mse +1.3 ± 1.0 pass the report's paired
test). The transfer set is what makes distillation pay: without it the gain is 0.9 ± 0.4
points. The student has 3.8x fewer parameters and 18.5x fewer FLOPs than the ensemble.
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/seed"
    return config
