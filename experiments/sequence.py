"""Token-level multi-teacher distillation: K causal token teachers -> a smaller student,
alone vs best single teacher vs several teachers (mean and per-token weightings), 3 seeds.

    python experiments/sequence.py                          # ~4-8 min on 2 shared CPUs
    python experiments/sequence.py --config.seeds=1 --config.output_dir=/tmp/seq

The work is in `mtkd_jax.experiment.sequence.run_sequence`; outputs go to
`config.output_dir` (results.md, results.json, perplexity.png, accuracy.png, TensorBoard).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mtkd_jax.experiment.sequence import run_sequence

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "sequence.py"),
    "Experiment config file (a get_config() returning a ConfigDict).", lock_config=True,
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    result = run_sequence(_CONFIG.value)
    print(result["markdown"])


if __name__ == "__main__":
    app.run(main)
