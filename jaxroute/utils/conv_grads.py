"""Loop-friendly convolution gradients for XLA:CPU.

Problem.  JAX differentiates ``conv_general_dilated`` w.r.t. its input with a
convolution whose kernel spec has the in/out feature dims swapped (for
Flax's HWIO kernels ``dim_labels=..._01oi->...``).  XLA:CPU rewrites such a
convolution into the canonical form its fast kernels (YNNPACK / Eigen) need
only in the *entry* computation; inside a ``while`` body -- ``lax.scan``,
``fori_loop``, ``while_loop``: DGR's T steps, every iterative attack -- it
stays non-canonical and runs on a generic, several times slower path.

Measured on a 2-core AMD EPYC CPU (``python -m benchmarks.routing``,
ResNet-20 gate gradients, batch 128, one device): 1,471.6 ms per
step inside a rolled ``lax.scan`` against 334.3 ms for the same step jitted
alone; with this rewrite, 265.5 ms per step in the scan, and whole DGR routing
5.7x faster (2.97 -> 17.06 images/s at batch 64).

Fix.  :func:`loop_friendly` re-evaluates a function's jaxpr with every
(ungrouped) convolution wrapped in a ``custom_vjp`` whose input gradient is
the same transposed convolution JAX would emit, but with the kernel's in/out
feature axes swapped *physically* (an explicit transpose of the flipped
kernel, constant-folded when the weights are constants), so the spec stays
canonical.  The kernel gradient uses JAX's own rule.  The math is unchanged:
results equal plain ``jax.grad`` up to float rounding (the tests check it).

Column pairing.  XLA:CPU gives a convolution to its fast library (YNNPACK)
only when max(C_in, C_out) > 16; narrower ones (ResNet-20's whole first
stage) run on Eigen at half the speed.  A SAME, stride-1 3x3 conv over an
even-width NHWC map is therefore computed over *column pairs*: one zero
column each side and a free reshape (W + 2, C) -> ((W + 2) / 2, 2C) turn it
into a VALID 3x2 conv over 2C channels (4/3 of the FLOPs, a quarter of the
pair kernel is zero), and its input gradient is the same construction with
the flipped, in/out-swapped kernel.  One core, 6-conv 16-channel stage,
forward + gate gradient in a scan: 179 -> 127 ms; DGR on ResNet-20 with one
device per core (2 cores, batch 32): 25.77 -> 30.72 images/s
(``python -m benchmarks.routing``, ``benchmarks/README.md``).  With one device spread over
several cores it is slower (14.28 vs
17.16 images/s, batch 64, 2 cores: YNNPACK splits these convs over threads
worse than Eigen), so by default it is used only when every device has at
most one core, which is how jaxroute sets up CPUs
(:func:`jaxroute.utils.devices.cpu_devices_per_core`).

It is applied on the CPU backend only (GPUs/TPUs have no such problem) by
:func:`jaxroute.routing.dgr_route` and every attack in
:mod:`jaxroute.attacks`, to any ``logits_fn`` -- jaxroute's models or your
own.  ``JAXROUTE_CONV_GRADS`` in the environment chooses, for comparisons:
``auto`` (default: canonical gradients, column pairing when each CPU device
has at most one core), ``paired`` (always pair), ``canonical`` (never pair),
``plain`` (no rewrite: JAX's own gradients).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


MODES = ("auto", "paired", "canonical", "plain")


def mode() -> str:
    """``JAXROUTE_CONV_GRADS`` (default ``auto``); see the module docstring."""
    m = os.environ.get("JAXROUTE_CONV_GRADS", "auto")
    if m not in MODES:
        raise ValueError(f"JAXROUTE_CONV_GRADS={m!r} is not one of {', '.join(MODES)}")
    return m


def enabled() -> bool:
    """True where the rewrite applies: the CPU backend, unless switched off."""
    return mode() != "plain" and jax.default_backend() == "cpu"


def pairing_helps() -> bool:
    """Whether :func:`loop_friendly` pairs narrow convs: ``paired``, or ``auto`` with <= 1 core per device."""
    m = mode()
    if m != "auto":
        return m == "paired"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return jax.local_device_count() >= cores


def formulation() -> str:
    """Which conv formulation :func:`loop_friendly` uses here: ``"paired"``, ``"canonical"`` or ``"plain"``.

    The formulations compute the same values up to float rounding; jobs record
    this so that a resume never mixes outputs computed two ways (it depends on
    the device count through :func:`pairing_helps`).
    """
    if not enabled():
        return "plain"
    return "paired" if pairing_helps() else "canonical"


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


def _pair_kernel(w):
    """(3, 3, C_in, C_out) -> (3, 2, 2*C_in, 2*C_out): a 3x3 conv as a 3x2 conv over column pairs.

    Pair tap ``p`` of input pair ``(2q-1, 2q)`` member ``a`` feeds output pair
    ``(2m, 2m+1)`` member ``b`` through original column tap ``2p + a - b``
    (taps outside 0..2 are the 1/4 of the pair kernel that is zero).
    """
    kh, kw, ci, co = w.shape
    k = jnp.zeros((kh, 2, 2, ci, 2, co), w.dtype)
    for p in range(2):
        for a in range(2):
            for b in range(2):
                if 0 <= 2 * p + a - b < kw:
                    k = k.at[:, p, a, :, b, :].set(w[:, 2 * p + a - b])
    return k.reshape(kh, 2, 2 * ci, 2 * co)


def _pair_conv(x, w, precision=None):
    """SAME, stride-1 3x3 NHWC/HWIO conv computed over column pairs (see :func:`_pairable`).

    Padding one column on each side and reshaping (W + 2, C) -> ((W + 2) / 2, 2C)
    is free in memory order; the result, a VALID 3x2 conv, reshapes back for free.
    """
    b, h, wd, c = x.shape
    # Zero columns by concatenation, not jnp.pad: the fused pads were among the slowest
    # element-wise ops of a DGR step (6-conv 16-channel stage in a scan, one core: 127 ms with
    # concatenate, 141 ms with pad).
    zero = jnp.zeros((b, h, 1, c), x.dtype)
    xp = jnp.concatenate([zero, x, zero], axis=2).reshape(b, h, wd // 2 + 1, 2 * c)
    y = lax.conv_general_dilated(xp, _pair_kernel(w), (1, 1), ((1, 1), (0, 0)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y.reshape(b, h, wd, w.shape[3])


def _pairable(params, lhs, rhs) -> bool:
    """Convs that run faster as :func:`_pair_conv` on XLA:CPU.

    XLA:CPU gives a conv to its fast library (YNNPACK) only when
    max(C_in, C_out) > 16; narrower convs run on Eigen at half the speed
    (``python -m benchmarks.conv_formulations``: 50 GFLOP/s per core for
    ResNet-20's 16-channel stage against ~106 for its 32/64-channel ones).
    Pairing columns doubles the channels at 4/3 of the FLOPs and runs at about
    77 GFLOP/s of useful work, forward and input gradient alike.
    """
    dn = params["dimension_numbers"]
    return (lhs.ndim == 4 and lhs.dtype == rhs.dtype and lhs.dtype in (jnp.float32, jnp.float64)
            and tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1)
            and tuple(dn.out_spec) == (0, 3, 1, 2)
            and rhs.shape[:2] == (3, 3) and max(rhs.shape[2], rhs.shape[3]) <= 16 and lhs.shape[2] % 2 == 0
            and tuple(params["window_strides"]) == (1, 1)
            and tuple(map(tuple, params["padding"])) == ((1, 1), (1, 1))
            and tuple(params["lhs_dilation"]) == (1, 1) and tuple(params["rhs_dilation"]) == (1, 1)
            and params.get("preferred_element_type") in (None, lhs.dtype))


def _conv(prim, params, lhs, rhs, pair: bool):
    """The conv ``prim.bind(lhs, rhs, **params)`` with a canonical input gradient (paired if ``pair``)."""
    precision = params.get("precision")
    if pair and _pairable(params, lhs, rhs):
        def forward(lhs, rhs):
            return _pair_conv(lhs, rhs, precision)

        def lhs_grad(g, lhs, rhs):
            # The input gradient of a SAME stride-1 3x3 conv is the same kind of conv with the
            # flipped, in/out-swapped kernel, so it pairs the same way (and stays canonical).
            return _pair_conv(g, jnp.swapaxes(rhs[::-1, ::-1], 2, 3), precision)
    else:
        def forward(lhs, rhs):
            return prim.bind(lhs, rhs, **params)

        def lhs_grad(g, lhs, rhs):
            return _lhs_grad(g, lhs.shape, rhs, params).astype(lhs.dtype)

    @jax.custom_vjp
    def conv(lhs, rhs):
        return forward(lhs, rhs)

    def fwd(lhs, rhs):
        return conv(lhs, rhs), (lhs, rhs)

    def bwd(res, g):
        lhs, rhs = res
        # The kernel gradient by JAX's own rule; dropped (and removed by XLA) when unused.
        _, vjp_r = jax.vjp(lambda r: prim.bind(lhs, r, **params), rhs)
        return lhs_grad(g, lhs, rhs), vjp_r(g)[0]

    conv.defvjp(fwd, bwd)
    return conv(lhs, rhs)


def _eval(pair, jaxpr, consts, *args):
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
            outs = [_conv(eqn.primitive, p, *invals, pair=pair)]
        elif name in _CALL_PRIMITIVES and ("jaxpr" in p or "call_jaxpr" in p):
            inner = p.get("jaxpr", p.get("call_jaxpr"))
            if hasattr(inner, "consts"):
                outs = _eval(pair, inner.jaxpr, inner.consts, *invals)
            else:
                outs = _eval(pair, inner, (), *invals)
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


def canonical_conv_grads(fn, pair_narrow: bool = False):
    """``fn`` (arrays -> pytree), re-evaluated with canonical-kernel convolution input gradients.

    ``pair_narrow``: also compute narrow SAME 3x3 convs over column pairs (see
    the module docstring).  Unconditional (any backend); :func:`loop_friendly`
    is what the library uses.
    """
    if getattr(fn, "_canonical_conv_grads", None) == pair_narrow:
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval(pair_narrow, closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    wrapped._canonical_conv_grads = pair_narrow
    return wrapped


def loop_friendly(fn):
    """``fn`` with :func:`canonical_conv_grads` where it helps (the CPU backend), else ``fn``.

    Column pairing follows :func:`pairing_helps`, decided when this is called.
    """
    return canonical_conv_grads(fn, pair_narrow=pairing_helps()) if enabled() else fn
