"""The article's pipeline end to end: K teachers -> predictions -> divergences -> targets ->
distilled students (every strategy) and codistillation -> evaluation, over several seeds.

    python experiments/seed.py                                    # the default, ~10 min on 2 CPUs
    python experiments/seed.py --config experiments/configs/seed.py --config.teachers.num=5
    python experiments/seed.py --config.distributed=True          # several hosts

Each config file states its exact command and expected result. The work is in
`mtkd_jax.experiment.run`; outputs go to `config.output_dir` (results.md, results.csv, PNG
plots, TensorBoard events, config.json, checkpoints).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mtkd_jax.experiment import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "seed.py"),
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
