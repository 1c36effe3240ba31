"""jaxroute.utils.devices: batch placement and the one "pad, run, keep the real rows" loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.utils.devices import map_batches


def test_map_batches_keeps_real_rows_and_handles_k_outputs_per_row():
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(10, dtype=np.int32)
    seen = []

    @jax.jit
    def body(x, y):
        return {"sum": x.sum(-1) + y, "twice": jnp.repeat(y, 2)}  # 1 and 2 outputs per input row

    def fn(i, xb, yb, none):
        assert none is None and xb.shape == (4, 3) and yb.shape == (4,)  # one fixed shape
        seen.append(i)
        return body(xb, yb)

    out = map_batches(fn, (x, y, None), 4)
    assert seen == [0, 1, 2]
    np.testing.assert_array_equal(out["sum"], 3 * np.arange(10) + np.arange(10))
    np.testing.assert_array_equal(out["twice"], np.repeat(np.arange(10), 2))  # sample-major, padding dropped


def test_map_batches_padding_repeats_the_last_real_row():
    got = []
    map_batches(lambda i, xb: got.append(np.asarray(xb)) or xb, (np.arange(5.0),), 4)
    np.testing.assert_array_equal(got[-1], [4.0, 4.0, 4.0, 4.0])


def test_map_batches_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        map_batches(lambda i, a, b: a, (np.zeros(3), np.zeros(4)), 2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        map_batches(lambda i, a: a, (np.zeros(3),), 0)
    with pytest.raises(ValueError, match="at least one array"):
        map_batches(lambda i, a: a, (None,), 2)
