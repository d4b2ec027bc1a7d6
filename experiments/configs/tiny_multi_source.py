"""A seconds-long multi-source run for the test suite (tests/test_multi_source.py).

Command:
    python experiments/seed.py --config experiments/configs/tiny_multi_source.py \
        --config.output_dir=/tmp/tiny_multi_source

Expected: the run folder of `tiny.py` (no TensorBoard, checkpoints or compression table) plus
``teacher_trust.png``, with 2 teachers that each know half of the classes, in 70-90 s
on the shared 2-CPU machine (mostly compiling). The numbers mean nothing.
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/tiny_multi_source"
    config.seeds = 1
    config.log_every = 1
    config.teachers.num = 2
    config.teachers.model_kwargs.features = (4, 4)
    config.teachers.model_kwargs.hidden = 8
    config.teachers.epochs = 1
    config.teachers.batch_size = 256
    config.student.model_kwargs.features = (8,)
    config.student.steps = 8
    config.student.batch_size = 256
    config.transfer.size = 128
    config.analysis.divergence_kinds = ("squared",)
    config.sources.kind = "classes"
    config.distill.strategies = ("best_teacher", "gate")
    config.distill.train_only = ()
    config.compression.enabled = False
    config.tensorboard = False
    config.checkpoints = False
    return config
