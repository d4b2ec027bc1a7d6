"""Language models on real text: domain teachers -> one student (`mtkd lm`).

    python experiments/lm.py                                  # the default config
    python experiments/lm.py --config experiments/configs/lm.py:quick

The work is in `mtkd_jax.experiment.lm.run_lm`; outputs go to `config.output_dir`
(results.md, results.json, PNG plots, TensorBoard events, checkpoints).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mtkd_jax.experiment.lm import run_lm

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "lm.py"),
    "Experiment config file (a get_config() returning a ConfigDict).", lock_config=True,
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    print(run_lm(_CONFIG.value)["markdown"])


if __name__ == "__main__":
    app.run(main)
