"""Token-level multi-teacher distillation: K causal token teachers -> a smaller student,
alone vs best single teacher vs several teachers (mean and per-token weightings), 3 seeds.

    python experiments/sequence.py                          # ~4-8 min on 2 shared CPUs
    python experiments/sequence.py --quick                  # a seconds-long smoke run
    python experiments/sequence.py --config.seeds=1 --config.output_dir=/tmp/seq

The same as `mtkd sequence experiments/configs/sequence.py [--quick] [--config.KEY=VALUE ...]`
(`mtkd_jax.cli`); the work is in `mtkd_jax.experiment.sequence.run_sequence`. Outputs go to
`config.output_dir` (results.md, results.json, perplexity.png, accuracy.png, TensorBoard).
"""

import os
import sys

from mtkd_jax.cli import main

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sequence.py")

if __name__ == "__main__":
    sys.exit(main(["sequence", "--config", _DEFAULT, *sys.argv[1:]]))
