"""The comparison table of distillation strategies, mean +- std over seeds, and the
compression table (parameters, FLOPs, latency of the student vs the teachers).

    python experiments/compare.py                      # experiments/configs/compare.py
    python experiments/compare.py --config.seeds=5 --config.distill.temperature=4.0
    python experiments/compare.py --quick              # a seconds-long smoke run

The same as `mtkd run experiments/configs/compare.py [--config.KEY=VALUE ...]` with a config
that asks for more rows (every strategy with the KL and the article's MSE objective, with
and without the transfer set); see the config file's header for its command and result.
"""

import os
import sys

from mtkd_jax.cli import main

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "compare.py")

if __name__ == "__main__":
    sys.exit(main(["run", "--config", _DEFAULT, *sys.argv[1:]]))
