"""A seconds-long run of the comparison (two seeds, KL and MSE rows), for the test suite.

Command:
    python experiments/compare.py --config experiments/configs/tiny_compare.py \
        --config.output_dir=/tmp/tiny_compare

Expected: results.md with mean ± std over 2 seeds for the rows teacher_0, teacher_1,
teachers (mean), ensemble, alone, best_teacher, confidence_mse, and the
compression table (a CNN1D and an MLP teacher with different learning rates); about as long
as tiny.py (mostly compilation) on the project's 2-CPU machine. The numbers mean nothing
(tiny models).
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/tiny_compare"
    config.seeds = 2
    config.teachers.num = 2
    config.teachers.model_kwargs.features = (4, 4)
    config.teachers.model_kwargs.hidden = 8
    config.teachers.epochs = 1
    config.force = True  # one epoch of tiny teachers can be at chance: distil anyway
    config.teachers.batch_size = 256
    config.teachers.learning_rates = (1e-2, 3e-3)
    config.teachers.models = ("cnn1d", "mlp")  # mixed architectures, trained one by one
    config.student.model_kwargs.features = (8,)
    config.student.steps = 8
    config.student.batch_size = 256
    config.distill.strategies = ("alone", "best_teacher", "confidence_mse")
    config.distill.train_only = ()
    config.transfer.size = 0
    config.analysis.divergence_kinds = ("kl",)
    config.checkpoints = False
    config.tensorboard = False
    config.compression.repeats = 5
    return config
