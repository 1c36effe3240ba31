"""Loop-friendly convolution gradients for XLA:CPU.

Problem.  JAX differentiates ``conv_general_dilated`` w.r.t. its input with a
convolution whose kernel spec has the in/out feature dims swapped (for
Flax's HWIO kernels ``dim_labels=..._01oi->...``).  XLA:CPU rewrites such a
convolution into the canonical form its fast kernels (YNNPACK / Eigen) need
only in the *entry* computation; inside a ``while`` body -- ``lax.scan``,
``fori_loop``, ``while_loop``: DGR's T steps, every iterative attack -- it
stays non-canonical and runs on a generic, several times slower path.

Measured on the project's 2-core CPU (``python -m benchmarks.routing``,
ResNet-20 gate gradients, batch 128, one device): 1,452 ms per step inside a
rolled ``lax.scan`` against 321 ms for the same step jitted alone; with this
rewrite, 269 ms per step in the scan, and whole DGR routing 5.7x faster
(3.08 -> 17.50 images/s at batch 64).

Fix.  :func:`loop_friendly` re-evaluates a function's jaxpr with every
(ungrouped) convolution wrapped in a ``custom_vjp`` whose input gradient is
the same transposed convolution JAX would emit, but with the kernel's in/out
feature axes swapped *physically* (an explicit transpose of the flipped
kernel, constant-folded when the weights are constants), so the spec stays
canonical.  The kernel gradient uses JAX's own rule.  The math is unchanged:
results equal plain ``jax.grad`` up to float rounding (the tests check it).

It is applied on the CPU backend only (GPUs/TPUs have no such problem) by
:func:`jaxroute.routing.dgr_route` and every attack in
:mod:`jaxroute.attacks`, to any ``logits_fn`` -- jaxroute's models or your
own.  ``JAXROUTE_CONV_GRADS=plain`` in the environment turns it off (for
comparisons).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def enabled() -> bool:
    """True where the rewrite applies: the CPU backend, unless switched off."""
    return os.environ.get("JAXROUTE_CONV_GRADS", "loop_friendly") != "plain" and \
        jax.default_backend() == "cpu"


def _dilate(shape, dilation):
    return [0 if s == 0 else 1 + d * (s - 1) for s, d in zip(shape, dilation)]


def _lhs_grad_padding(in_shape, window, strides, out_shape, padding, lhs_dilation, rhs_dilation):
    """Padding of the transposed convolution that gives the input gradient (as JAX computes it)."""
    lhs_d = _dilate(in_shape, lhs_dilation)
    rhs_d = _dilate(window, rhs_dilation)
    out_d = _dilate(out_shape, strides)
    before = [r - lo - 1 for r, (lo, _) in zip(rhs_d, padding)]
    after = [l + r - 1 - o - b for l, r, o, b in zip(lhs_d, rhs_d, out_d, before)]
    return list(zip(before, after))


def _lhs_grad(g, lhs_shape, rhs, params):
    """Input gradient of ``conv_general_dilated`` with a canonical (physically transposed) kernel."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    lhs_sd, rhs_sd, out_sd = lhs_spec[2:], rhs_spec[2:], out_spec[2:]
    padding = _lhs_grad_padding(
        np.take(lhs_shape, lhs_sd), np.take(rhs.shape, rhs_sd), params["window_strides"],
        np.take(g.shape, out_sd), params["padding"], params["lhs_dilation"], params["rhs_dilation"])
    w = lax.rev(rhs, rhs_sd)
    w = jnp.swapaxes(w, rhs_spec[0], rhs_spec[1]).astype(g.dtype)  # out <-> in features, physically
    return lax.conv_general_dilated(
        g, w, window_strides=params["lhs_dilation"], padding=padding,
        lhs_dilation=params["window_strides"], rhs_dilation=params["rhs_dilation"],
        dimension_numbers=lax.ConvDimensionNumbers(out_spec, rhs_spec, lhs_spec),
        precision=params.get("precision"))


def _conv(prim, params, lhs, rhs):
    @jax.custom_vjp
    def conv(lhs, rhs):
        return prim.bind(lhs, rhs, **params)

    def fwd(lhs, rhs):
        return conv(lhs, rhs), (lhs, rhs)

    def bwd(res, g):
        lhs, rhs = res
        dl = _lhs_grad(g, lhs.shape, rhs, params).astype(lhs.dtype)
        # The kernel gradient by JAX's own rule; dropped (and removed by XLA) when unused.
        _, vjp_r = jax.vjp(lambda r: prim.bind(lhs, r, **params), rhs)
        return dl, vjp_r(g)[0]

    conv.defvjp(fwd, bwd)
    return conv(lhs, rhs)


def _eval(jaxpr, consts, *args):
    from jax.extend.core import Literal

    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        p = eqn.params
        if (name == "conv_general_dilated" and p.get("feature_group_count", 1) == 1
                and p.get("batch_group_count", 1) == 1):
            outs = [_conv(eqn.primitive, p, *invals)]
        elif name in _CALL_PRIMITIVES and ("jaxpr" in p or "call_jaxpr" in p):
            inner = p.get("jaxpr", p.get("call_jaxpr"))
            if hasattr(inner, "consts"):
                outs = _eval(inner.jaxpr, inner.consts, *invals)
            else:
                outs = _eval(inner, (), *invals)
        else:
            bp = eqn.primitive.get_bind_params(p)
            subfuns = []
            if isinstance(bp, tuple) and len(bp) == 2 and isinstance(bp[1], dict):
                subfuns, bp = bp
            ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
            if ctx is not None:
                with ctx:
                    outs = eqn.primitive.bind(*subfuns, *invals, **bp)
            else:
                outs = eqn.primitive.bind(*subfuns, *invals, **bp)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, val in zip(eqn.outvars, outs):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def canonical_conv_grads(fn):
    """``fn`` (arrays -> pytree), re-evaluated with canonical-kernel convolution input gradients.

    Unconditional (any backend); :func:`loop_friendly` is what the library uses.
    """
    if getattr(fn, "_canonical_conv_grads", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    wrapped._canonical_conv_grads = True
    return wrapped


def loop_friendly(fn):
    """``fn`` with :func:`canonical_conv_grads` where it helps (the CPU backend), else ``fn``."""
    return canonical_conv_grads(fn) if enabled() else fn
