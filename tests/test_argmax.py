"""`core.argmax.is_argmax` is exactly `np.argmax(x, -1) == index`: ties, NaN, +-inf, indices
outside the axis, any leading shape; and the steps' accuracy it computes."""

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from mtkd_jax.core.argmax import is_argmax

# Few distinct values, so that ties are common; NaN and infinities mixed in.
VALUES = st.sampled_from([0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan])


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.sampled_from([(6,), (3, 5), (2, 3, 4)]),  # few compiles
                    elements=VALUES),
       data=st.data())
def test_matches_numpy_argmax(x, data):
    n = x.shape[-1]
    index = data.draw(hnp.arrays(np.int32, x.shape[:-1],
                                 elements=st.integers(-2, n + 1)))
    want = np.argmax(x, axis=-1) == index
    got = is_argmax(jnp.asarray(x), jnp.asarray(index))
    np.testing.assert_array_equal(np.asarray(got), want)
    # The true argmax is always recognised.
    assert bool(np.all(is_argmax(jnp.asarray(x), jnp.asarray(np.argmax(x, -1)))))


def test_random_logits_and_integers(rng):
    x = rng.standard_normal((4, 9, 1000)).astype(np.float32)
    index = np.where(rng.random((4, 9)) < 0.5, np.argmax(x, -1), rng.integers(0, 1000, (4, 9)))
    np.testing.assert_array_equal(np.asarray(is_argmax(x, index)), np.argmax(x, -1) == index)
    xi = rng.integers(0, 3, (5, 6)).astype(np.int32)  # integer inputs, ties everywhere
    for idx in range(6):
        want = np.argmax(xi, -1) == idx
        np.testing.assert_array_equal(np.asarray(is_argmax(xi, np.full(5, idx))), want)


def test_bad_index_shape():
    with pytest.raises(ValueError, match="`index` must have the shape"):
        is_argmax(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="`index` must have the shape"):
        is_argmax(jnp.zeros(()), jnp.zeros((), jnp.int32))
