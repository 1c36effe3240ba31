"""What a calculation path costs: per-sample MACs from z, and a forward pass that skips the
inactive filters.

MACs (multiply-accumulates, what the paper calls FLOPs) of one sample, from its
gates: a controlled conv computes only its active filters, and the next conv of
the block reads only those, so in a CIFAR ResNet block conv1 costs
HW·9·C_in·|z1| and conv2 HW·9·|z1|·|z2|; the stem conv and the classifier are
dense; each controller adds C·C/γ + C/γ·N (its GAP and biases are not counted,
the MI classifier W_cla is used in training only).  On digits_cnn conv2 and
conv3 read the gated output of the conv before (conv1 is dense).
:func:`dense_macs` is the plain network; :func:`xla_flops` reads XLA's
``cost_analysis`` of a compiled function, to check the analytic count.

:func:`gathered_forward` runs a decoupled CIFAR ResNet on one image with
every controlled conv's weights *sliced to the active filters*, padded to a
static per-layer capacity (so one compiled program serves every path; the
padding filters are masked to zero).  A block whose conv1 has more active
filters than its capacity runs dense (masked); a conv2 over capacity runs
with all output filters; both are counted in the returned ``overflow``.
Its logits equal the masked dense forward's (eval mode).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.models.gated import GatedModel

_CIFAR = ("resnet20", "resnet32", "resnet56")


def conv_layout(model: GatedModel) -> list[dict]:
    """The convs and linear layers of a decoupled model: ``hw`` output positions, ``kk`` kernel
    taps, ``c_in``/``c_out`` channels and the gate points that prune them (None: dense)."""
    arch = model.meta.arch
    layers = []
    if arch in _CIFAR:
        n = (model.module.depth - 2) // 6
        layers.append(_conv3x3("conv1", 32, 1, 3, 16))
        c, size = 16, 32
        for s, planes in enumerate((16, 32, 64), start=1):
            for b in range(n):
                p, stride = f"layer{s}.{b}", (2 if (s > 1 and b == 0) else 1)
                layers.append(_conv3x3(f"{p}.conv1", size, stride, c, planes, None, f"{p}.conv1", c))
                size //= stride
                layers.append(_conv3x3(f"{p}.conv2", size, 1, planes, planes, f"{p}.conv1", f"{p}.conv2", planes))
                c = planes
        layers.append(_linear(64, model.num_classes))
    elif arch == "digits_cnn":
        layers += [_conv3x3("conv1", 8, 1, 1, 32), _conv3x3("conv2", 8, 1, 32, 64, None, "conv2", 32),
                   _conv3x3("conv3", 4, 1, 64, 128, "conv2", "conv3", 64), _linear(128, model.num_classes, "conv3")]
    else:
        raise ValueError(f"MAC counting supports {', '.join(_CIFAR + ('digits_cnn',))}; got {arch!r}")
    return layers


def _conv3x3(name, size_in, stride, c_in, c_out, in_gate=None, out_gate=None, ctrl_in=None):
    """A 3x3 conv with padding 1 on a square input; ``valid`` counts (output, tap) pairs off the padding."""
    size_out = size_in // stride
    per_dim = sum(1 for o in range(size_out) for k in range(3) if 0 <= o * stride + k - 1 < size_in)
    d = dict(name=name, hw=size_out ** 2, kk=9, valid=per_dim ** 2, c_in=c_in, c_out=c_out,
             in_gate=in_gate, out_gate=out_gate)
    if ctrl_in is not None:
        d["ctrl_in"] = ctrl_in
    return d


def _linear(c_in, c_out, in_gate=None):
    return dict(name="linear", hw=1, kk=1, valid=1, c_in=c_in, c_out=c_out, in_gate=in_gate, out_gate=None)


def dense_macs(model: GatedModel, exclude_padding: bool = False) -> int:
    """MACs of one sample through the plain network (no controllers, every filter).

    The paper's convention counts every kernel tap at every output position;
    ``exclude_padding=True`` skips the taps that fall on the zero padding, which
    is what XLA's ``cost_analysis`` counts for a convolution.
    """
    return int(sum((l["valid"] if exclude_padding else l["hw"] * l["kk"]) * l["c_in"] * l["c_out"]
                   for l in conv_layout(model)))


def controller_macs(model: GatedModel) -> int:
    """MACs of all controllers for one sample (two FC layers each)."""
    g = model.module.controller_reduction
    return int(sum(l["ctrl_in"] * (l["ctrl_in"] // g) + (l["ctrl_in"] // g) * l["c_out"]
                   for l in conv_layout(model) if l.get("out_gate")))


def macs_per_sample(model: GatedModel, z: Mapping) -> np.ndarray:
    """(B,) MACs of each sample given its gate tree ``z`` ({point: (B, N)}), controllers included.

    A pruned linear input (digits_cnn's conv3 feeds the classifier through GAP)
    is counted with its active channels, as in the convs.
    """
    b = len(next(iter(z.values())))
    active = {p: np.asarray(v).reshape(b, -1).astype(bool).sum(-1) for p, v in z.items()}
    total = np.full(b, controller_macs(model), np.int64)
    for l in conv_layout(model):
        cin = active[l["in_gate"]] if l["in_gate"] else l["c_in"]
        cout = active[l["out_gate"]] if l["out_gate"] else l["c_out"]
        total = total + l["hw"] * l["kk"] * np.asarray(cin, np.int64) * np.asarray(cout, np.int64)
    return total


def xla_flops(fn, *args) -> float:
    """FLOPs XLA counts for ``jit(fn)(*args)`` (``cost_analysis``); a MAC is 2 FLOPs there."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def capacities(z: Mapping, quantile: float = 1.0, minimum: int = 1) -> dict[str, int]:
    """A static capacity per gate point: the ``quantile`` of the active-filter counts over the
    inputs of ``z`` (a calibration set), rounded up, at least ``minimum``."""
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    out = {}
    for p, v in z.items():
        v = np.asarray(v)
        counts = v.reshape(len(v), -1).astype(bool).sum(-1)
        out[p] = int(min(v.shape[-1], max(minimum, np.ceil(np.quantile(counts, quantile)))))
    return out


# ---------------------------------------------------------------- gathered forward
def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _bn(h, p, s, idx=None):
    scale, bias, mean, var = p["scale"], p["bias"], s["mean"], s["var"]
    if idx is not None:
        scale, bias, mean, var = scale[idx], bias[idx], mean[idx], var[idx]
    return (h - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias


def _ctrl_logits(c, s, rows=None):
    w1 = c["fc1"]["kernel"] if rows is None else c["fc1"]["kernel"][rows]
    return jax.nn.relu(s @ w1 + c["fc1"]["bias"]) @ c["fc2"]["kernel"] + c["fc2"]["bias"]


def _active(z, cap):
    idx = jnp.nonzero(z, size=cap, fill_value=0)[0]
    return idx, (jnp.arange(cap) < z.sum()).astype(jnp.float32)


def _block(x, p, s, stride, caps):
    """One option-A block on one image, gathered; returns (output, overflow count)."""
    planes = p["conv1"]["kernel"].shape[-1]
    cap1, cap2 = caps
    k1, k2 = p["conv1"]["kernel"], p["conv2"]["kernel"]
    z1 = _ctrl_logits(p["controller1"], x.mean((1, 2)))[0] > 0

    def shortcut():
        if stride != 1 or x.shape[-1] != planes:
            q = planes // 4
            return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (q, q)))
        return x

    def dense(_):
        h = jax.nn.relu(_bn(_conv(x, k1, stride), p["bn1"], s["bn1"])) * z1
        z2 = _ctrl_logits(p["controller2"], h.mean((1, 2)))[0] > 0
        out = _bn(_conv(h, k2, 1), p["bn2"], s["bn2"]) * z2
        return jax.nn.relu(out + shortcut()), jnp.int32(1)

    def gathered(_):
        idx1, valid1 = _active(z1, cap1)
        h = jax.nn.relu(_bn(_conv(x, k1[..., idx1], stride), p["bn1"], s["bn1"], idx1)) * valid1
        z2 = _ctrl_logits(p["controller2"], h.mean((1, 2)), idx1)[0] > 0
        k2in = k2[:, :, idx1, :]

        def conv2_gathered(_):
            idx2, valid2 = _active(z2, cap2)
            o = _bn(_conv(h, k2in[..., idx2], 1), p["bn2"], s["bn2"], idx2) * valid2
            full = jnp.zeros(o.shape[:3] + (planes,), o.dtype).at[..., idx2].add(o)
            return full, jnp.int32(0)

        def conv2_dense(_):
            return _bn(_conv(h, k2in, 1), p["bn2"], s["bn2"]) * z2, jnp.int32(1)

        out, over = jax.lax.cond(z2.sum() > cap2, conv2_dense, conv2_gathered, None)
        return jax.nn.relu(out + shortcut()), over

    return jax.lax.cond(z1.sum() > cap1, dense, gathered, None)


def gathered_forward(model: GatedModel, caps: Mapping[str, int] | None = None):
    """A function ``f(x) -> (logits, overflow)`` for one image ``x`` (1, 32, 32, 3) of a decoupled
    CIFAR ResNet (eval mode), computing only the active filters of every controlled conv.

    ``caps``: static capacity per gate point (:func:`capacities`); default every filter.
    ``overflow`` counts the layers that exceeded their capacity and ran dense.
    """
    arch = model.meta.arch
    if arch not in _CIFAR or model.gate_placement != "decouple":
        raise ValueError(f"gathered_forward supports decoupled {', '.join(_CIFAR)}; got {arch!r} "
                         f"with gate placement {model.gate_placement!r}")
    n = (model.module.depth - 2) // 6
    spec = dict(zip(model.spec.names, model.spec.channels))
    caps = dict(spec if caps is None else caps)
    for name, c in spec.items():
        if not isinstance(caps.get(name), (int, np.integer)) or not 1 <= caps[name] <= c:
            raise ValueError(f"capacity of {name!r} must be an integer in [1, {c}], got {caps.get(name)!r}")
    # JAX arrays: the weights are indexed with traced filter indices
    P, S = jax.tree.map(jnp.asarray, (model.variables["params"], model.variables["batch_stats"]))
    mean, std = jnp.asarray(model.meta.mean), jnp.asarray(model.meta.std)

    def f(x):
        if x.shape != (1, 32, 32, 3):
            raise ValueError(f"gathered_forward takes one image (1, 32, 32, 3), got {x.shape}")
        h = jax.nn.relu(_bn(_conv((x - mean) / std, P["conv1"]["kernel"], 1), P["bn1"], S["bn1"]))
        over = jnp.int32(0)
        for st in range(1, 4):
            for b in range(n):
                name = f"layer{st}_{b}"
                pre = f"layer{st}.{b}"
                h, o = _block(h, P[name], S[name], 2 if (st > 1 and b == 0) else 1,
                              (caps[f"{pre}.conv1"], caps[f"{pre}.conv2"]))
                over = over + o
        logits = h.mean((1, 2)) @ P["linear"]["kernel"] + P["linear"]["bias"]
        return logits, over

    return f
