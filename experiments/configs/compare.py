"""The comparison table: every strategy with the KL and the article's MSE objective, with and
without the transfer set, mean ± std over 5 seeds, plus the compression table.

Command:
    python experiments/compare.py --config experiments/configs/compare.py

MNIST-1D, 3 CNN1D teachers, MLP(256, 256) student, 40000 transfer inputs, 5 seeds: 14 rows
in 4 student trainings per seed (alone; the KL rows stacked; the MSE rows stacked; the KL
rows without the transfer set stacked). Not measured in this version; expect about 5/3 of
the default run's CPU time (experiments/configs/seed.py) plus the extra rows.
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/compare"
    config.seeds = 5
    config.distill.strategies = (
        "alone",
        "best_teacher", "best_teacher_mse",
        "mean", "mean_mse",
        "scores", "scores_mse",
        "confidence", "confidence_mse",
        "entropy", "entropy_mse",
        "agreement", "agreement_mse",
        "codistill",
    )
    config.distill.train_only = ("best_teacher", "mean", "entropy")
    return config
