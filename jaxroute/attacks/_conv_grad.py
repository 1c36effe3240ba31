"""Work around slow input-gradient convolutions inside XLA:CPU loops.

Problem.  JAX differentiates ``conv_general_dilated`` w.r.t. its input with
a convolution whose kernel spec has the in/out feature dims swapped (for
Flax's HWIO kernels: ``dim_labels=..._01oi->...``).  XLA:CPU rewrites such
non-canonical convolutions into the canonical form that its fast (Eigen)
kernels need only in the *entry* computation; a convolution inside a
``while`` body (``lax.while_loop``/``fori_loop``/``scan``) stays
non-canonical and runs on a generic, far slower code path.  Measured on
ResNet-20, batch 40, 2 CPU cores: 10 gradient steps take ~0.9 s unrolled
and ~9 s in a ``fori_loop``.

Fix.  :func:`canonical_conv_grads` re-evaluates ``logits_fn``'s jaxpr with
every (ungrouped) convolution wrapped in a ``custom_vjp`` whose input
gradient is the same transposed convolution, but with the kernel's in/out
axes swapped *physically* (an explicit transpose of the flipped kernel)
so the spec stays canonical.  The math is identical (the gradient w.r.t.
the kernel uses JAX's own rule); results agree with plain ``jax.grad`` to
float rounding.  Applied automatically by the attacks on the CPU backend;
set ``jaxroute.attacks.core.CONV_GRAD_WORKAROUND = False`` to turn it off.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:  # private helpers of JAX's own conv transpose rule
    from jax._src.lax.convolution import (
        ConvDimensionNumbers, _conv_general_vjp_lhs_padding, _conv_sdims,
    )
    _AVAILABLE = True
except Exception:  # pragma: no cover - a JAX without these helpers: no workaround
    _AVAILABLE = False

_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def _lhs_grad(g, lhs_shape, rhs, params):
    """Input gradient of conv_general_dilated with a canonical (physically transposed) kernel."""
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn
    lhs_sdims, rhs_sdims, out_sdims = map(_conv_sdims, dn)
    padding = _conv_general_vjp_lhs_padding(
        np.take(lhs_shape, lhs_sdims), np.take(rhs.shape, rhs_sdims), params["window_strides"],
        np.take(g.shape, out_sdims), params["padding"], params["lhs_dilation"], params["rhs_dilation"])
    w = lax.rev(rhs, rhs_sdims)
    w = jnp.swapaxes(w, rhs_spec[0], rhs_spec[1])     # physically swap out/in features
    if w.dtype != g.dtype:
        w = w.astype(g.dtype)
    out = lax.conv_general_dilated(
        g, w, window_strides=params["lhs_dilation"], padding=padding,
        lhs_dilation=params["window_strides"], rhs_dilation=params["rhs_dilation"],
        dimension_numbers=ConvDimensionNumbers(out_spec, rhs_spec, lhs_spec),
        precision=params.get("precision"))
    return out


def _conv(prim, params, lhs, rhs):
    @jax.custom_vjp
    def conv(lhs, rhs):
        return prim.bind(lhs, rhs, **params)

    def fwd(lhs, rhs):
        return conv(lhs, rhs), (lhs, rhs)

    def bwd(res, g):
        lhs, rhs = res
        dl = _lhs_grad(g, lhs.shape, rhs, params).astype(lhs.dtype)
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
                subfuns, bp = bp            # older JAX: (subfuns, params)
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
    """``fn`` (arrays -> pytree), re-evaluated with loop-friendly convolution gradients."""
    if not _AVAILABLE or getattr(fn, "_canonical_conv_grads", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree.leaves(args)
        outs = _eval(closed.jaxpr, closed.consts, *leaves)
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    wrapped._canonical_conv_grads = True
    return wrapped
