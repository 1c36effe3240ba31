"""Benchmark: ways to compute ResNet-20's 3x3 convolutions and their input gradients on XLA:CPU.

    python -m benchmarks.conv_formulations                  # batch 32, the DGR operating point
    taskset -c 0 python -m benchmarks.conv_formulations     # one core: per-device throughput
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.conv_formulations

DGR's cost is one forward and one input-gradient (w.r.t. activations, not
weights) pass per step, through every conv of the net.  For each conv shape
of CIFAR ResNet-20 this prints GFLOP/s (nominal: 2*H_out*W_out*C_out*C_in*9
per image, the work of a direct conv, whatever a formulation really does) of
the forward and of the input gradient for:

* ``native``: ``lax.conv_general_dilated``; input gradient with a canonical
  kernel, as :mod:`jaxroute.utils.conv_grads` computes it (what jaxroute runs
  for every conv it does not pair);
* ``im2col``: 9 shifted slices concatenated on channels, one matmul; its
  gradient is the transposed matmul plus a scatter-add of the 9 slices;
* ``kw-fold`` (16-channel layers): the 3 horizontal taps folded into input
  channels, a 3x1 conv over 48 channels (identical FLOPs);
* ``pair`` (16-channel layers): columns paired by a free reshape, a 3x2 conv
  over 32 channels (4/3 of the FLOPs); zero columns from ``jnp.pad`` and the
  input gradient by JAX's transpose of the pair conv;
* ``grouped`` (16-channel layers): two images folded into the channels of one
  grouped conv (identical FLOPs);
* ``polyphase`` (stride-2 input gradients): one 2x2 conv to 4x channels and
  a depth-to-space shuffle instead of a base-dilated conv.

Why these: XLA:CPU hands a conv to its fast library (YNNPACK) only when
max(C_in, C_out) > 16 and there is no base dilation; the other convs (ResNet's
16-channel stage, stride-2 input gradients) run on Eigen at about half the
speed.  Each alternative reshapes the problem to pass that test.  The result
(``benchmarks/README.md``, "What was tried" 4 and 8): in isolation kw-fold and
pair beat ``native`` on the 16-channel layers, im2col and grouped lose; end to
end none of them wins as built here, because the reshuffles cost what the
faster kernels save.  Column pairing pays off once its input gradient uses the
same pair construction and its zero columns come from a concatenate, which is
how :mod:`jaxroute.utils.conv_grads` builds it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

LAYERS = [  # (spatial size, C_in, C_out, stride) of ResNet-20's 3x3 convs
    (32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2), (8, 64, 64, 1)]
DN = ("NHWC", "HWIO", "NHWC")


def formulations():
    import jax.numpy as jnp
    from jax import lax

    from jaxroute.utils.conv_grads import _lhs_grad

    def native(x, w, s):
        return lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=DN)

    def native_grad(gy, w, s, xshape):
        params = {"dimension_numbers": lax.conv_dimension_numbers(xshape, w.shape, DN),
                  "window_strides": (s, s), "padding": ((1, 1), (1, 1)), "lhs_dilation": (1, 1),
                  "rhs_dilation": (1, 1), "precision": None}
        return _lhs_grad(gy, xshape, w, params)

    def im2col(x, w, s):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, wd = x.shape[1] // s, x.shape[2] // s
        p = jnp.concatenate([xp[:, i:i + s * h:s, j:j + s * wd:s, :] for i in range(3) for j in range(3)], -1)
        return jnp.dot(p.reshape(-1, p.shape[-1]), w.reshape(-1, w.shape[-1])).reshape(x.shape[0], h, wd, -1)

    def kw_fold(x, w, s):
        xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
        x3 = jnp.concatenate([xp[:, :, j:j + x.shape[2], :] for j in range(3)], -1)
        w3 = w.reshape(3, 1, 3 * w.shape[2], w.shape[3])
        return lax.conv_general_dilated(x3, w3, (1, 1), ((1, 1), (0, 0)), dimension_numbers=DN)

    def pair_kernel(w):
        kh, kw, ci, co = w.shape
        k = jnp.zeros((kh, 2, 2, ci, 2, co), w.dtype)
        for p in range(2):          # pair tap
            for a in range(2):      # member of the input pair (columns 2q-1, 2q)
                for b in range(2):  # member of the output pair (columns 2m, 2m+1)
                    t = 2 * p + a - b
                    if 0 <= t < kw:
                        k = k.at[:, p, a, :, b, :].set(w[:, t])
        return k.reshape(kh, 2, 2 * ci, 2 * co)

    def pair(x, w, s):
        b, h, wd, c = x.shape
        xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0))).reshape(b, h, wd // 2 + 1, 2 * c)
        y = lax.conv_general_dilated(xp, pair_kernel(w), (1, 1), ((1, 1), (0, 0)), dimension_numbers=DN)
        return y.reshape(b, h, wd, -1)

    def grouped(x, w, s):
        b, h, wd, c = x.shape
        xg = x.reshape(2, b // 2, h, wd, c).transpose(1, 2, 3, 0, 4).reshape(b // 2, h, wd, 2 * c)
        y = lax.conv_general_dilated(xg, jnp.concatenate([w, w], axis=3), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=DN, feature_group_count=2)
        co = w.shape[3]
        return y.reshape(b // 2, h, wd, 2, co).transpose(3, 0, 1, 2, 4).reshape(b, h, wd, co)

    def polyphase_grad(gy, w, s, xshape):
        kh, kw, ci, co = w.shape
        k = jnp.zeros((2, 2, co, 2, 2, ci), w.dtype)
        taps = {0: [(0, 1)], 1: [(0, 2), (1, 0)]}   # phase -> [(window tap, kernel index)]
        wt = jnp.swapaxes(w, 2, 3)
        for a in (0, 1):
            for p, kr in taps[a]:
                for b in (0, 1):
                    for q, kc in taps[b]:
                        k = k.at[p, q, :, a, b, :].set(wt[kr, kc])
        out = lax.conv_general_dilated(gy, k.reshape(2, 2, co, 4 * ci), (1, 1), ((0, 1), (0, 1)),
                                       dimension_numbers=DN)
        n, h, wd, _ = out.shape
        return out.reshape(n, h, wd, 2, 2, ci).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * wd, ci)

    return native, native_grad, {"im2col": im2col, "kw-fold": kw_fold, "pair": pair, "grouped": grouped}, \
        polyphase_grad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    native, native_grad, alts, polyphase_grad = formulations()

    def timeit(fn, *a):
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"# conv formulations on XLA:CPU\n- cpu: {cpu}; usable cores {usable}; jax {jax.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; batch {args.batch}; median of {args.repeats}")
    a = jnp.ones((1024, 1024))
    peak = 2 * 1024**3 / timeit(jax.jit(jnp.dot), a, a) / 1e9
    print(f"- matmul 1024x1024 float32: {peak:.1f} GFLOP/s\n")
    print("| layer | formulation | fwd GFLOP/s | input-grad GFLOP/s |\n|---|---|---:|---:|")
    rows = []
    b = args.batch
    for hw, ci, co, s in LAYERS:
        kx, kw = jax.random.split(jax.random.key(hw * 1000 + ci * 10 + s))
        x = jax.random.normal(kx, (b, hw, hw, ci))
        w = jax.random.normal(kw, (3, 3, ci, co)) * 0.1
        gflop = 2 * b * (hw // s) ** 2 * co * ci * 9 / 1e9
        y = native(x, w, s)
        ref_grad = jax.vjp(lambda x: native(x, w, s), x)[1](y)[0]
        layer = f"{hw}x{hw} {ci}->{co} s{s}"
        cands = {"native": (lambda x: native(x, w, s), lambda gy: native_grad(gy, w, s, x.shape))}
        for name, fn in alts.items():
            if name in ("kw-fold", "pair", "grouped") and (max(ci, co) > 16 or s != 1):
                continue
            if name == "im2col" or max(ci, co) <= 16:
                f = (lambda fn: lambda x: fn(x, w, s))(fn)
                cands[name] = (f, (lambda f: lambda gy: jax.vjp(f, x)[1](gy)[0])(f))
        if s == 2:
            cands["polyphase"] = (None, lambda gy: polyphase_grad(gy, w, s, x.shape))
        for name, (fwd, grad) in cands.items():
            tf = None
            if fwd is not None:
                fj = jax.jit(fwd)
                if not np.allclose(fj(x), y, atol=1e-3):
                    raise AssertionError(f"{name} forward differs on {layer}")
                tf = gflop / timeit(fj, x)
            gj = jax.jit(grad)
            if not np.allclose(gj(y), ref_grad, atol=1e-3, rtol=1e-4):
                raise AssertionError(f"{name} input gradient differs on {layer}")
            tg = gflop / timeit(gj, y)
            rows.append({"layer": layer, "formulation": name, "fwd_gflops": tf, "grad_gflops": tg})
            print(f"| {layer} | {name} | {'—' if tf is None else f'{tf:.0f}'} | {tg:.0f} |", flush=True)
    print(json.dumps({"benchmark": "conv_formulations", "matmul_gflops": peak, "batch": b, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
