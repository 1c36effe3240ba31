"""PyTorch reference models for the parity tests.

Written from the architecture descriptions (``../shared/models/cifar10-resnet/
README.md`` for the CIFAR ResNets, the torchvision model-zoo layouts for the
ImageNet nets), not from the jaxroute code, so that the parity tests check
the Flax models against an independent implementation.

All models take NCHW input that is already normalized (mean/std applied),
like their upstream counterparts.  Each model's ``forward_features`` returns
the penultimate features (the input of the last linear layer).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, Sec. 4.2), option-A shortcut
# --------------------------------------------------------------------------


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            pad = planes // 4
            # Option A: keep every second row/column from index 0, zero-pad channels both sides.
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0.0)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Depth 6N+2; state-dict names conv1, bn1, layerS.B.{conv1,bn1,conv2,bn2}, linear."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for s, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(CifarBasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward_features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.forward_features(x))


# --------------------------------------------------------------------------
# VGG-16 (torchvision layout) and CIFAR VGG-16-BN
# --------------------------------------------------------------------------

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg_features(batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(c, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
    return nn.Sequential(*layers)


class VGG16(nn.Module):
    """torchvision ``vgg16``: features.N, avgpool (AdaptiveAvgPool2d(7)), classifier.0/3/6."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = _vgg_features(batch_norm=False)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward_features(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:6](x)

    def forward(self, x):
        return self.classifier[6](self.forward_features(x))


class VGG16BNCifar(nn.Module):
    """vgg16_bn feature indices; no avgpool; classifier 512-512-classes at 0/3/6."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = _vgg_features(batch_norm=True)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, num_classes),
        )

    def forward_features(self, x):
        return self.classifier[:6](torch.flatten(self.features(x), 1))

    def forward(self, x):
        return self.classifier[6](self.forward_features(x))


# --------------------------------------------------------------------------
# AlexNet (torchvision layout)
# --------------------------------------------------------------------------


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),   # 0
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),            # 3
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),           # 6
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),           # 8
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),           # 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(256 * 6 * 6, 4096),                            # 1
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),                                   # 4
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),                            # 6
        )

    def forward_features(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:6](x)

    def forward(self, x):
        return self.classifier[6](self.forward_features(x))


# --------------------------------------------------------------------------
# ImageNet ResNet-18 / ResNet-50 (torchvision layout, v1.5)
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


# --------------------------------------------------------------------------
# CIFAR ResNet-20 for saliency libraries: one nn.ReLU module per use, gates
# --------------------------------------------------------------------------
class Gate(nn.Module):
    """A gate point: multiplies its channels by that point's slice of the flat gates (or passes)."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x, gates):
        return x if gates is None else x * gates[:, self.lo:self.hi, None, None]


class GatedReluBlock(nn.Module):
    def __init__(self, in_planes, planes, stride, gate_inner, gate_out):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.gate1 = gate_inner
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()  # the residual ReLU, a module of its own
        self.gate_out = gate_out
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else None

    def forward(self, x, gates):
        out = self.gate1(self.relu1(self.bn1(self.conv1(x))), gates)
        out = self.bn2(self.conv2(out))
        sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.gate_out(self.relu2(out + sc), gates)


class GatedReluResNet20(nn.Module):
    """CIFAR ResNet-20 (option A) on [0, 1] NCHW *pixels* (it normalizes with the ImageNet mean/std
    itself), one non-in-place ``nn.ReLU`` module per use -- residual ones included -- so that
    module-hooking saliency libraries (Captum's Deconvolution, GuidedBackprop) reach every ReLU,
    and a gate module after every ``post_act`` ReLU.  ``forward(x, gates)``: ``gates`` None or flat
    per-sample gates (B, D) in the order of ``names``/``channels`` (jaxroute's ``model.spec``)."""

    def __init__(self, names, channels):
        super().__init__()
        offsets = np.cumsum((0,) + tuple(channels)[:-1])
        bounds = {n: (int(o), int(o + c)) for n, c, o in zip(names, channels, offsets)}
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.gate = Gate(*bounds["conv1"])
        in_planes = 16
        for s, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(3):
                p = f"layer{s}.{b}"
                blocks.append(GatedReluBlock(in_planes, planes, 2 if (s > 1 and b == 0) else 1,
                                    Gate(*bounds[f"{p}.conv1"]), Gate(*bounds[p])))
                in_planes = planes
            setattr(self, f"layer{s}", nn.ModuleList(blocks))
        self.linear = nn.Linear(64, 10)

    def forward(self, x, gates=None):
        h = self.gate(self.relu(self.bn1(self.conv1((x - self.mean) / self.std))), gates)
        for layer in (self.layer1, self.layer2, self.layer3):
            for blk in layer:
                h = blk(h, gates)
        return self.linear(h.mean(dim=(2, 3)))


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

BUILDERS = {
    "resnet20": lambda: CifarResNet(20),
    "resnet32": lambda: CifarResNet(32),
    "resnet44": lambda: CifarResNet(44),
    "resnet56": lambda: CifarResNet(56),
    "vgg16": lambda: VGG16(1000),
    "vgg16_bn_cifar": lambda: VGG16BNCifar(10),
    "alexnet": lambda: AlexNet(1000),
    "resnet18": lambda: resnet18(1000),
    "resnet50": lambda: resnet50(1000),
}


def build(name: str) -> nn.Module:
    return BUILDERS[name]()


def randomize_(model: nn.Module, seed: int = 0, calib_shape=(8, 3, 32, 32)) -> nn.Module:
    """Give every parameter and BN buffer nontrivial random values, in place.

    Default init leaves BN at identity (weight 1, bias 0, mean 0, var 1),
    which would hide a wrong mapping of the BN tensors.  Here conv/linear
    weights are He-normal with random biases; BN affine parameters are
    random; and the BN running statistics are first *calibrated* on a batch
    of random input of ``calib_shape`` (NCHW, normalized-pixel scale), then
    perturbed.  Calibrated statistics keep activations O(1) through deep
    residual nets (random ones make ResNet-50 logits explode to ~1e4, where
    float32 rounding alone exceeds the parity tolerance), while the
    perturbation keeps BN from being an exact normalization.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in bns:
            c = m.num_features
            m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
        # Residual branches end in a smaller BN scale, as in trained ResNets (and
        # "zero-init residual" training): a random net of full-scale branches is
        # chaotic and amplifies float32 rounding by ~20x over ResNet-50's depth.
        for blk in model.modules():
            last = {CifarBasicBlock: "bn2", GatedReluBlock: "bn2", BasicBlock: "bn2", Bottleneck: "bn3"}.get(type(blk))
            if last is not None:
                getattr(blk, last).weight.mul_(0.3)
        if bns:
            # cumulative average over one batch = that batch's statistics
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            model(torch.randn(calib_shape, generator=g))
            for m, mom in zip(bns, momenta):
                m.momentum = mom
        for m in bns:
            c = m.num_features
            # a (nearly) dead channel has ~0 variance; dividing by it would amplify
            # float32 rounding noise a hundredfold, unlike in a trained net
            m.running_var.clamp_(min=0.1 * float(m.running_var.mean()))
            std = m.running_var.sqrt()
            m.running_mean.add_(0.1 * std * torch.randn(c, generator=g))
            m.running_var.mul_(0.8 + 0.45 * torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(7)
    return model.eval()


def normalize_nchw(x_nhwc, mean, std) -> torch.Tensor:
    """NHWC pixel-space numpy batch -> normalized NCHW torch tensor."""
    x = torch.as_tensor(x_nhwc, dtype=torch.float32).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()
