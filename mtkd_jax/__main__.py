"""`python -m mtkd_jax ...`: the `mtkd` command (`mtkd_jax.cli`)."""

import sys

from mtkd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
