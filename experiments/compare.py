"""The comparison table of distillation strategies, mean +- std over seeds, and the
compression table (parameters, FLOPs, latency of the student vs the teachers).

    python experiments/compare.py                      # experiments/configs/compare.py
    python experiments/compare.py --config.seeds=5 --config.distill.temperature=4.0

Same library function as `seed.py` (`mtkd_jax.experiment.run`) with a config that asks for
more rows (every strategy with the KL and the article's MSE objective, with and without the
transfer set); see the config file's header for its command and expected result.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mtkd_jax.experiment import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "compare.py"),
    "Experiment config file (a get_config() returning a ConfigDict).", lock_config=True,
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
