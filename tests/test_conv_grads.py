"""Loop-friendly convolution gradients: same numbers as jax.grad, canonical kernels in loops."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxroute.utils.conv_grads import canonical_conv_grads, loop_friendly

CASES = [
    # (lhs shape, kernel shape, strides, padding, lhs_dilation, rhs_dilation, dimension numbers)
    ((2, 9, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 9, 8, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 10, 7, 4), (3, 2, 4, 6), (2, 1), ((0, 2), (1, 0)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 11, 11, 4), (3, 3, 4, 6), (1, 1), ((2, 2), (2, 2)), (1, 1), (2, 2), ("NHWC", "HWIO", "NHWC")),
    ((2, 4, 9, 9), (6, 4, 5, 5), (3, 3), ((2, 2), (2, 2)), (1, 1), (1, 1), ("NCHW", "OIHW", "NCHW")),
    ((1, 7, 7, 2), (3, 3, 2, 3), (1, 1), ((1, 1), (1, 1)), (2, 2), (1, 1), ("NHWC", "HWIO", "NHWC")),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_gradients_equal_jax_grad(case):
    lhs_shape, rhs_shape, strides, padding, lhs_dil, rhs_dil, dn = case
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, lhs_shape)
    w = jax.random.normal(kw, rhs_shape)

    def f(x, w):
        y = lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dimension_numbers=dn)
        return jnp.sum(jnp.tanh(y) * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

    ref = jax.grad(f, argnums=(0, 1))(x, w)
    got = jax.grad(canonical_conv_grads(f), argnums=(0, 1))(x, w)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(canonical_conv_grads(f)(x, w), f(x, w), rtol=1e-6)


def test_grouped_convolution_is_left_alone_and_still_correct():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))

    def f(x):
        return jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=2,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)

    np.testing.assert_allclose(jax.grad(canonical_conv_grads(f))(x), jax.grad(f)(x), rtol=1e-5)


def test_pytrees_nested_jit_and_scan():
    """A gate-tree argument, an inner jit and a scan over gradient steps: same iterates."""
    w1 = jax.random.normal(jax.random.key(3), (3, 3, 3, 8)) * 0.3
    w2 = jax.random.normal(jax.random.key(4), (3, 3, 8, 4)) * 0.3
    x = jax.random.uniform(jax.random.key(5), (4, 8, 8, 3))

    @jax.jit
    def block(h, w):
        return jax.nn.relu(lax.conv_general_dilated(h, w, (2, 2), ((1, 1), (1, 1)),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")))

    def logits_fn(gates, x):
        h = block(x, w1) * gates["a"][:, None, None, :]
        h = block(h, w2) * gates["b"][:, None, None, :]
        return h.mean(axis=(1, 2))

    def run(fn):
        def step(g, _):
            grad = jax.grad(lambda g: jnp.sum(jax.nn.log_softmax(fn(g, x))[:, 0]))(g)
            return jax.tree.map(lambda a, b: a - 0.1 * b, g, grad), None
        g0 = {"a": jnp.ones((4, 8)), "b": jnp.ones((4, 4))}
        return jax.jit(lambda g: jax.lax.scan(step, g, None, length=5)[0])(g0)

    ref, got = run(logits_fn), run(canonical_conv_grads(logits_fn))
    for k in ref:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-6)


def test_no_noncanonical_kernel_left_inside_the_loop():
    """The reason for the rewrite: in a rolled loop, JAX's own input gradient keeps
    the swapped kernel spec (01oi) that XLA:CPU runs on a slow path."""
    if jax.default_backend() != "cpu":
        pytest.skip("the rewrite targets XLA:CPU")
    w = jax.random.normal(jax.random.key(6), (3, 3, 16, 32))
    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 16))

    def f(x):
        return jnp.sum(lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)

    def loop(fn):
        body = lambda h, _: (h - 1e-3 * jax.grad(fn)(h), None)
        return jax.jit(lambda h: jax.lax.scan(body, h, None, length=3)[0]).lower(x).compile().as_text()

    assert "01oi" in loop(f)           # the problem exists in this JAX/XLA ...
    assert "01oi" not in loop(loop_friendly(f))  # ... and the rewrite removes it


def test_can_be_switched_off(monkeypatch):
    f = lambda x: x * 2.0
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "plain")
    assert loop_friendly(f) is f
    monkeypatch.delenv("JAXROUTE_CONV_GRADS")
    assert (loop_friendly(f) is f) == (jax.default_backend() != "cpu")
    g = canonical_conv_grads(f)
    assert canonical_conv_grads(g) is g   # idempotent


PAIR_CASES = [  # narrow SAME stride-1 3x3 convs over even widths: computed over column pairs
    ((2, 6, 8, 16), (3, 3, 16, 16)),
    ((3, 5, 10, 3), (3, 3, 3, 16)),   # the stem of a CIFAR ResNet: 3 -> 16
    ((2, 4, 6, 16), (3, 3, 16, 8)),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=[f"pair{i}" for i in range(len(PAIR_CASES))])
def test_column_pairing_gives_the_same_values_and_gradients(case):
    lhs_shape, rhs_shape = case
    x = jax.random.normal(jax.random.key(10), lhs_shape)
    w = jax.random.normal(jax.random.key(11), rhs_shape)

    def f(x, w):
        y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

    paired = canonical_conv_grads(f, pair_narrow=True)
    # The rewrite really takes the paired route: a 3x2 kernel over twice the channels.
    assert f"{rhs_shape[2] * 2},{rhs_shape[3] * 2}]" in str(jax.make_jaxpr(paired)(x, w))
    np.testing.assert_allclose(paired(x, w), f(x, w), rtol=1e-5, atol=1e-4)  # a sum of ~1e3 terms
    for r, g in zip(jax.grad(f, argnums=(0, 1))(x, w), jax.grad(paired, argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_pairing_leaves_other_convs_alone():
    """Wide, strided, odd-width or VALID convs keep the plain canonical path."""
    for lhs_shape, rhs_shape, strides, padding in [((1, 8, 8, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1))),
                                                   ((1, 8, 8, 16), (3, 3, 16, 16), (2, 2), ((1, 1), (1, 1))),
                                                   ((1, 8, 7, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
                                                   ((1, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((0, 0), (0, 0)))]:
        x, w = jnp.ones(lhs_shape), jnp.ones(rhs_shape)
        f = lambda x: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        jaxpr = str(jax.make_jaxpr(canonical_conv_grads(f, pair_narrow=True))(x))
        assert "3,2," not in jaxpr, (lhs_shape, strides, padding)


def test_pairing_policy(monkeypatch):
    from jaxroute.utils import conv_grads

    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "paired")
    assert conv_grads.pairing_helps()
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "canonical")
    assert not conv_grads.pairing_helps()
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "auto")
    cores = len(os.sched_getaffinity(0))
    assert conv_grads.pairing_helps() == (jax.local_device_count() >= cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(jax.local_device_count() + 1)))
    assert not conv_grads.pairing_helps()   # a device with more than one core: Eigen's threads win
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "fast")
    with pytest.raises(ValueError, match="JAXROUTE_CONV_GRADS='fast' is not one of"):
        conv_grads.pairing_helps()
