"""PyTorch peers of jaxroute's DGR, for the routing benchmark.

Two ways to run Distillation Guided Routing (Wang et al., CVPR 2018) in
PyTorch on the CIFAR ResNets:

* :func:`dgr_official` -- the official release's way: ONE image at a time,
  a fresh ``torch.optim.SGD([gates], lr=0.1, momentum=0.9)`` per image and
  T iterations, each a forward + backward of the gated net; the gates are
  clamped to [clip_min, clip_max] after every step.  Iteration t evaluates
  the loss/prediction of Λ_t (t = 0..T-1) before stepping, so it runs
  1 forward (the distillation target) + T forward/backward passes.
* :func:`dgr_batched` -- the strongest batched peer we could write: the B
  samples' gates form one (B, D) leaf tensor, the summed per-sample loss is
  back-propagated once per step (samples are independent in eval mode, so
  the gradient rows are the per-sample gradients), and one SGD-with-momentum
  optimizer over the (B, D) tensor is per-sample because SGD is elementwise.
  Weights have ``requires_grad_(False)`` so autograd computes activation
  gradients only; activations are ``channels_last``.  It follows jaxroute's
  exact algorithm (``jaxroute/routing/dgr.py``): step 0 is driven by the L1
  subgradient alone (the CE gradient is exactly 0 at Λ = 1), candidates are
  Λ_1..Λ_T, fallback Λ_0 = 1, i.e. T-1 forward/backward + 2 forward passes --
  so it routes the same problem and its gates can be compared with jaxroute's.

The network is an explicit PyTorch CIFAR ResNet (option-A shortcut) written
from ``../shared/models/cifar10-resnet/README.md``, with per-channel gate
multiplications at the same points as jaxroute's ``gate_placement="post_act"``:
after the stem BN+ReLU (``conv1``), after each block's first BN+ReLU
(``layerS.B.conv1``) and after each block's residual ReLU (``layerS.B``).
Models take *normalized* NCHW input; :func:`to_torch_input` does the
(constant) normalization once, outside the timed loops.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GatedBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x, g1=None, g2=None):
        out = F.relu(self.bn1(self.conv1(x)))
        if g1 is not None:
            out = out * g1
        out = self.bn2(self.conv2(out))
        if self.pad:
            # Option A: rows/cols 0, 2, 4, ...; zero-pad the channels on both sides.
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            sc = x
        out = F.relu(out + sc)
        if g2 is not None:
            out = out * g2
        return out


class GatedCifarResNet(nn.Module):
    """CIFAR ResNet-(6N+2) whose ``forward(x, gates)`` multiplies the gates in.

    ``gates``: None or a list, in forward order (:attr:`gate_names`), of
    tensors broadcastable against the activations: ``(C, 1, 1)`` for one
    image, ``(B, C, 1, 1)`` per sample.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6N+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        names, channels = ["conv1"], [16]
        in_planes = 16
        for s, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(n):
                blocks.append(GatedBlock(in_planes, planes, 2 if (s > 1 and b == 0) else 1))
                in_planes = planes
                names += [f"layer{s}.{b}.conv1", f"layer{s}.{b}"]
                channels += [planes, planes]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        self.gate_names: tuple[str, ...] = tuple(names)
        self.gate_channels: tuple[int, ...] = tuple(channels)

    def forward(self, x, gates: Sequence[torch.Tensor] | None = None):
        g = (lambda i: None) if gates is None else (lambda i: gates[i])
        out = F.relu(self.bn1(self.conv1(x)))
        if gates is not None:
            out = out * gates[0]
        i = 1
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                out = block(out, g(i), g(i + 1))
                i += 2
        return self.linear(out.mean(dim=(2, 3)))


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """The akamaster checkpoint: legacy pickle, ``module.`` prefixes, CUDA storages."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model


def flatten_variables(variables: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested Flax variables -> ``{"params/layer1_0/conv1/kernel": ndarray}`` (no flax needed)."""
    out = {}
    for k, v in variables.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if hasattr(v, "items"):
            out.update(flatten_variables(v, key))
        else:
            out[key] = np.asarray(v)
    return out


def state_dict_from_flax(variables: dict) -> dict[str, torch.Tensor]:
    """Flax CIFAR-ResNet variables (jaxroute naming; nested, or flat "/"-joined
    as :func:`flatten_variables` gives) -> this module's state dict.

    Used for the random-init models, so that both peers route the same net.
    """
    flat = variables if all(isinstance(k, str) and "/" in k for k in variables) else flatten_variables(variables)
    out = {}
    for key, a in flat.items():
        col, *path, leaf = key.split("/")
        mod = ".".join(p.replace("_", ".") for p in path)  # layer1_0/conv1 -> layer1.0.conv1
        a = np.asarray(a, np.float32)
        if col == "params":
            if leaf == "kernel" and a.ndim == 4:
                out[f"{mod}.weight"] = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            elif leaf == "kernel":
                out[f"{mod}.weight"] = a.T
            elif leaf == "scale":
                out[f"{mod}.weight"] = a
            elif leaf == "bias":
                out[f"{mod}.bias"] = a
            else:
                raise KeyError(f"unexpected Flax parameter {key}")
        elif col == "batch_stats":
            out[f"{mod}.running_{'mean' if leaf == 'mean' else 'var'}"] = a
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in out.items()}


def build_model(depth: int, checkpoint=None, flax_variables=None, channels_last: bool = False) -> GatedCifarResNet:
    """Eval-mode, frozen-weight gated ResNet with weights from a checkpoint or Flax variables."""
    model = GatedCifarResNet(depth)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    elif flax_variables is not None:
        model.load_state_dict(state_dict_from_flax(flax_variables), strict=True)
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_torch_input(x_nhwc: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   channels_last: bool = False, dtype=np.float32) -> torch.Tensor:
    """NHWC pixel-space [0, 1] numpy images -> normalized NCHW torch tensor of ``dtype``."""
    x = (np.asarray(x_nhwc, dtype) - np.asarray(mean, dtype)) / np.asarray(std, dtype)
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


class PixelSpace(nn.Module):
    """``model`` behind its input normalization: takes NCHW pixels in [0, 1].

    Attack libraries such as torchattacks work in pixel space and expect the
    normalization inside the model (as jaxroute's attacks do).
    """

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def soft_ce(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of softmax(logits) against the soft target p."""
    return -(p * F.log_softmax(logits, dim=-1)).sum(-1)


def _split(model: GatedCifarResNet, flat: torch.Tensor) -> list[torch.Tensor]:
    """(B, D) or (D,) flat gates -> list of (B, C, 1, 1) / (C, 1, 1) views in forward order."""
    parts = torch.split(flat, list(model.gate_channels), dim=-1)
    return [p.unsqueeze(-1).unsqueeze(-1) for p in parts]


def dgr_official(model: GatedCifarResNet, x1: torch.Tensor, steps: int = 30, lr: float = 0.1,
                 momentum: float = 0.9, gamma: float = 0.05, clip=(0.0, 10.0)) -> dict:
    """Route ONE image (x1: (1, 3, H, W), normalized) the official release's way."""
    d = sum(model.gate_channels)
    with torch.no_grad():
        full = model(x1)
        p = F.softmax(full, dim=-1)
        pred = int(full.argmax(-1))
    gates = torch.ones(d, device=x1.device, requires_grad=True)
    opt = torch.optim.SGD([gates], lr=lr, momentum=momentum)
    best, best_loss = torch.ones(d, device=x1.device), float("inf")
    for _ in range(steps):
        logits = model(x1, _split(model, gates))
        loss = soft_ce(logits, p).sum() + gamma * gates.abs().sum()
        lv = float(loss.detach())
        if int(logits.argmax(-1)) == pred and lv < best_loss:
            best, best_loss = gates.detach().clone(), lv
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            gates.clamp_(*clip)
    return {"cdrp": best, "loss": best_loss, "pred": pred}


def dgr_batched(model: GatedCifarResNet, x: torch.Tensor, steps: int = 30, lr: float = 0.1,
                momentum: float = 0.9, gamma: float = 0.05, clip=(0.0, 10.0)) -> dict:
    """Route a batch (x: (B, 3, H, W), normalized) at once; jaxroute's algorithm exactly."""
    b, d = x.shape[0], sum(model.gate_channels)
    with torch.no_grad():
        full = model(x)
        p = F.softmax(full, dim=-1)
        pred = full.argmax(-1)
    ones = torch.ones(b, d, dtype=x.dtype, device=x.device)
    gates = ones.clone().requires_grad_(True)
    opt = torch.optim.SGD([gates], lr=lr, momentum=momentum)
    best_g, best_logits = ones.clone(), full.clone()
    best_loss = torch.full((b,), float("inf"), dtype=x.dtype, device=x.device)
    found = torch.zeros(b, dtype=torch.bool, device=x.device)

    def consider(g, logits):
        nonlocal best_g, best_logits, best_loss, found
        loss = soft_ce(logits, p) + gamma * g.abs().sum(-1)
        ok = (logits.argmax(-1) == pred) & (loss < best_loss)
        best_g = torch.where(ok[:, None], g, best_g)
        best_logits = torch.where(ok[:, None], logits, best_logits)
        best_loss = torch.where(ok, loss, best_loss)
        found = found | ok

    # Step 0: at Λ = 1, q == p and the CE gradient is exactly zero -> L1 subgradient only.
    gates.grad = gamma * torch.sign(gates.detach())
    opt.step()
    with torch.no_grad():
        gates.clamp_(*clip)
    for _ in range(steps - 1):
        logits = model(x, _split(model, gates))
        ce = soft_ce(logits, p)
        with torch.no_grad():
            consider(gates.detach(), logits.detach())
        opt.zero_grad(set_to_none=True)
        ce.sum().backward()
        with torch.no_grad():
            gates.grad.add_(torch.sign(gates), alpha=gamma)
        opt.step()
        with torch.no_grad():
            gates.clamp_(*clip)
    with torch.no_grad():
        g = gates.detach()
        consider(g, model(x, _split(model, g)))
    return {"cdrp": best_g, "loss": best_loss, "fell_back": ~found, "pred": pred,
            "gated_logits": best_logits, "full_logits": full}


def fwd_bwd_step(model: GatedCifarResNet, x: torch.Tensor, gates: torch.Tensor, p: torch.Tensor):
    """One DGR step's forward + backward w.r.t. the (B, D) gates (for per-step timing)."""
    g = gates.detach().requires_grad_(True)
    ce = soft_ce(model(x, _split(model, g)), p)
    ce.sum().backward()
    return g.grad


def set_threads(n: int | None = None) -> int:
    torch.set_num_threads(n or os.cpu_count() or 1)
    return torch.get_num_threads()
