"""Models by name, with the metadata that belongs to them.

``create_model("resnet20")`` returns the Flax module; ``model_card(name)``
returns the architecture's defaults (input shape, classes, normalization).
A model's normalization lives in the module (``mean``/``std``) and in its
checkpoint metadata, never with the caller.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxroute.models.digits_cnn import DigitsCNN
from jaxroute.models.gates import GateSpec
from jaxroute.models.base import IMAGENET_MEAN, IMAGENET_STD
from jaxroute.models.resnet_cifar import CifarResNet
from jaxroute.models.resnet_imagenet import ImageNetResNet
from jaxroute.models.vgg import AlexNet, VGG16

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DIGITS_CLASSES = tuple(str(i) for i in range(10))


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # H, W, C of the images it was made for
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    class_names: tuple[str, ...] | None = None


def _cifar_resnet(depth):
    return ModelCard(
        f"resnet{depth}", lambda **kw: CifarResNet(depth=depth, **kw), (32, 32, 3), 10,
        IMAGENET_MEAN, IMAGENET_STD,
        f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcut); the shared "
        "pretrained checkpoints use ImageNet mean/std",
        CIFAR10_CLASSES,
    )


_CARDS = {c.name: c for c in [
    *(_cifar_resnet(d) for d in (20, 32, 44, 56)),
    ModelCard("vgg16", lambda **kw: VGG16(**kw), (224, 224, 3), 1000, IMAGENET_MEAN, IMAGENET_STD,
              "ImageNet VGG-16 without BN, torchvision layout"),
    ModelCard("vgg16_bn_cifar",
              lambda **kw: VGG16(**{"num_classes": 10, "batch_norm": True, "pool_to": None,
                                    "hidden": 512, **kw}),
              (32, 32, 3), 10, IMAGENET_MEAN, IMAGENET_STD,
              "CIFAR VGG-16 with BN, classifier 512-512-classes", CIFAR10_CLASSES),
    ModelCard("alexnet", lambda **kw: AlexNet(**kw), (224, 224, 3), 1000, IMAGENET_MEAN, IMAGENET_STD,
              "ImageNet AlexNet, torchvision layout"),
    ModelCard("resnet18", lambda **kw: ImageNetResNet(depth=18, **kw), (224, 224, 3), 1000,
              IMAGENET_MEAN, IMAGENET_STD, "ImageNet ResNet-18, torchvision layout"),
    ModelCard("resnet50", lambda **kw: ImageNetResNet(depth=50, **kw), (224, 224, 3), 1000,
              IMAGENET_MEAN, IMAGENET_STD, "ImageNet ResNet-50, torchvision layout"),
    ModelCard("digits_cnn", lambda **kw: DigitsCNN(**kw), (8, 8, 1), 10, (0.5,), (0.5,),
              "small CNN for scikit-learn's 8x8 digits", DIGITS_CLASSES),
]}


def list_models() -> list[str]:
    return sorted(_CARDS)


def model_card(name: str) -> ModelCard:
    if name not in _CARDS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _CARDS[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model by name.  ``overrides`` set module fields (``num_classes``,
    ``gate_placement``, ``mean``, ``std``)."""
    card = model_card(name)
    kw = {"num_classes": card.num_classes, "mean": card.mean, "std": card.std, **overrides}
    return card.build(**kw)


def init_model(model: nn.Module, key: jax.Array, input_shape) -> dict:
    """Random variables for ``model`` on images of ``input_shape`` = (H, W, C).

    Compiled at XLA's optimisation level 0: the program runs once, and at the
    default level XLA spends most of the time optimising the initialisers'
    random-number code (ResNet-20 on a CPU core: 17.6 s to compile, 2.7 s at
    level 0).  The values are those of the level-0 program, deterministic in
    ``key``.
    """
    x = jnp.zeros((1, *input_shape), jnp.float32)
    compiled = jax.jit(model.init).lower(key, x).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(key, x)


def gate_spec(model: nn.Module, input_shape) -> GateSpec:
    """Names and channel counts of the model's gate points, in forward order.

    Traced abstractly (``jax.eval_shape``): no FLOPs, no weights needed.
    """
    order: list[tuple[str, int]] = []

    def trace(x):
        variables = model.init(jax.random.key(0), x)
        logits, cap = model.apply(variables, x, capture=True)
        # The module builds cap["gates"] in forward order; read it here, before
        # JAX flattens (and so key-sorts) the returned pytree.
        order.extend((k, int(v.shape[-1])) for k, v in cap["gates"].items())
        return logits

    jax.eval_shape(trace, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return GateSpec(tuple(n for n, _ in order), tuple(c for _, c in order))
