"""The default run (the README's command): the article's pipeline on MNIST-1D, 3 seeds.

Command:
    python experiments/seed.py
    # the same as: python experiments/seed.py --config experiments/configs/seed.py

Expected: EXPECTED_RESULT
"""

from mtkd_jax.experiment.config import default_config


def get_config():
    config = default_config()
    config.output_dir = "runs/seed"
    return config
