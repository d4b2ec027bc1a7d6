"""A seconds-long run of the whole seed pipeline, for the test suite (tests/test_experiments.py).

Command:
    python experiments/seed.py --config experiments/configs/tiny.py --config.output_dir=/tmp/tiny

Expected: every output of a run (results.md, results.csv, results_per_seed.csv,
compression.csv, analysis.json, histories.json, the four PNGs, TensorBoard events,
config.json, checkpoints): 86 s wall, ~60 s of it compiling, measured 2026-12-02 on the
project's 2-CPU machine at a load of ~8 (JAX 0.10.2, CPU). The models are far too small and
short-trained for the numbers to mean anything (teachers ~30-40% accuracy).
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/tiny"
    config.seeds = 1
    config.log_every = 1
    config.teachers.num = 2
    config.teachers.model_kwargs.features = (4, 4)
    config.teachers.model_kwargs.hidden = 8
    config.teachers.epochs = 1
    config.force = True  # one epoch of tiny teachers can be at chance: distil anyway
    config.teachers.batch_size = 256
    config.student.model_kwargs.features = (8,)
    config.student.steps = 8
    config.student.batch_size = 256
    config.distill.strategies = ("alone", "mean", "codistill")
    config.distill.train_only = ("mean",)
    config.codistill.epochs = 1
    config.transfer.size = 128
    config.analysis.divergence_kinds = ("squared", "js")
    config.compression.repeats = 5
    return config
