"""The comparison table: every strategy with the KL and the article's MSE objective, with and
without the transfer set, mean ± std over 5 seeds, plus the compression table.

Command:
    python experiments/compare.py --config experiments/configs/compare.py

Expected (MNIST-1D, 3 CNN1D teachers, MLP(256, 256) student, 20000 transfer inputs, 2-CPU
machine, about 15 minutes): EXPECTED_RESULT
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
