"""Test setup: 8 fake CPU devices in the test processes, set before jax initialises its
backends; the entry points that tests start as subprocesses see the user's own XLA_FLAGS (one
CPU device here, as a user's run: on 8 fake devices sharing 2 cores an end-to-end run took
2.3x as long). A subprocess test that wants several devices sets the flag itself.

Both compile at LLVM optimisation level 0 (`--xla_backend_optimization_level=0`, unless the
user's flags set a level): compiling is most of the suite's time, and the level changes how
fast the compiled code runs, not the HLO XLA emits (the suite took ~0.75x the time with it);
results of differently shaped programs (a batch of 16 against one row) may differ in the last
float32 bit, as they may at any level. Timings are measured in benchmarks/, never here."""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0"
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")
if "xla_backend_optimization_level" not in (_USER_XLA_FLAGS or ""):
    _USER_XLA_FLAGS = ((_USER_XLA_FLAGS or "") + " " + _FAST_COMPILE).strip()
os.environ["XLA_FLAGS"] = (
    (_USER_XLA_FLAGS or "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_cache"))

import jax  # noqa: E402

jax.devices()  # the backends read XLA_FLAGS now, once
if _USER_XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _USER_XLA_FLAGS
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


@pytest.fixture
def rng():
    """A fresh numpy Generator per test, seeded from the test's name for reproducibility."""
    import zlib

    test = os.environ.get("PYTEST_CURRENT_TEST", "mtkd")
    return np.random.default_rng(zlib.crc32(test.encode()))


@pytest.fixture(scope="session")
def num_devices():
    return jax.device_count()
