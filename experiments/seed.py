"""The article's pipeline end to end: K teachers -> predictions -> divergences -> targets ->
distilled students (every strategy) and codistillation -> evaluation, over several seeds.

    python experiments/seed.py                                    # the default (README)
    python experiments/seed.py --quick                            # a seconds-long smoke run
    python experiments/seed.py --config experiments/configs/seed.py --config.teachers.num=5
    python experiments/seed.py --config experiments/configs/multi_source_classes.py --quick
    python experiments/seed.py --help                             # every config key

The same as `mtkd run experiments/configs/seed.py [--quick] [--config.KEY=VALUE ...]`
(`mtkd_jax.cli`).
Each config file states its exact command and measured result; outputs go to
`config.output_dir` (results.md, results.csv, PNG plots, TensorBoard events, config.json,
checkpoints). Exit codes: 0, 2 for a config mistake, 130 when stopped by Ctrl-C.
"""

import os
import sys

from mtkd_jax.cli import main

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "seed.py")

if __name__ == "__main__":
    sys.exit(main(["run", "--config", _DEFAULT, *sys.argv[1:]]))
