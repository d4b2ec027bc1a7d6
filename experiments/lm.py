"""Language models on real text: domain teachers -> one student (`mtkd lm`).

    python experiments/lm.py                 # the default config, 3 seeds
    python experiments/lm.py --quick         # a test-sized run
    python experiments/lm.py --config.seeds=1 --config.output_dir=/tmp/lm

The same as `mtkd lm experiments/configs/lm.py [--quick] [--config.KEY=VALUE ...]`
(`mtkd_jax.cli`); the work is in `mtkd_jax.experiment.lm.run_lm`. Outputs go to
`config.output_dir` (results.md, results.json, PNG plots, TensorBoard, checkpoints).
"""

import os
import sys

from mtkd_jax.cli import main

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm.py")

if __name__ == "__main__":
    sys.exit(main(["lm", "--config", _DEFAULT, *sys.argv[1:]]))
