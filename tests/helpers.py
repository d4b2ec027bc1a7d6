"""Float64 NumPy references and random inputs shared by the numerical tests (written once).

Imported as `from helpers import ...` (pytest puts this folder on `sys.path`).
"""

import jax
import numpy as np

SHAPE = (3, 2, 4, 5)  # [K, B1, B2, C]: teacher axis first, two batch axes, classes
TOL = dict(rtol=2e-5, atol=2e-6)  # float32 results against float64 references


def np_log_softmax(z, temperature=1.0, axis=-1):
    """log softmax(z / T) over `axis`, in float64."""
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def np_softmax(z, temperature=1.0, axis=-1):
    """softmax(z / T) over `axis`, in float64."""
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def random_probs(rng, shape=SHAPE, dtype=np.float32):
    """Fresh probability vectors over the last axis (Dirichlet(1))."""
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(dtype)


def random_logits(rng, shape=SHAPE, scale=2.0):
    """Fresh float32 logits, standard normal times `scale`."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def assert_matches(fn, args, expected, *, tol=None, **kwargs):
    """`fn(*args, **kwargs)` called eagerly and under `jax.jit` has the shape of the float64
    reference `expected` and equals it to `tol` (default `TOL`)."""
    tol = TOL if tol is None else tol
    eager = fn(*args, **kwargs)
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))(*args)
    assert np.shape(eager) == np.shape(expected), (np.shape(eager), np.shape(expected))
    np.testing.assert_allclose(eager, expected, **tol)
    np.testing.assert_allclose(jitted, expected, **tol)
