"""The evaluation transform a model's images go through: resize the shorter side, crop the centre.

Each model card states its input pipeline (:func:`preprocess_for`):

* ImageNet architectures (``resnet18``, ``resnet50``, ``vgg16``, ``alexnet``):
  the standard evaluation transform of torchvision's reference scripts --
  shorter side resized to 256 with bilinear interpolation (Pillow's, which
  antialiases when it shrinks: the filter support widens with the scale), then
  the central 224 x 224 crop.
* CIFAR and digits models: their own input size (32 or 8).  Images of that
  size pass through unchanged (Pillow's resize to the same size is a copy);
  others are resized (shorter side) and centre-cropped to it.

The long side follows torchvision's ``Resize(int)``: ``int(size * long / short)``
(truncated), and the crop offsets its ``center_crop``: ``round((H - crop) / 2)``,
so pixels agree with a torchvision ``Compose([Resize, CenterCrop])`` on PIL images.
The output is uint8 (H, W, C): quantising after the resize is what Pillow does
and what a stored (converted) split holds.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxroute.utils.checks import check_int

IMAGENET_RESIZE = 256  # shorter side before the 224 centre crop (torchvision reference evaluation)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Shorter side to ``resize`` (bilinear, antialiased), centre crop ``crop`` x ``crop``, ``channels`` 1 or 3."""

    resize: int
    crop: int
    channels: int = 3

    def __post_init__(self):
        for name in ("resize", "crop"):
            check_int(getattr(self, name), f"Preprocess.{name} (pixels)")
        if self.crop > self.resize:
            raise ValueError(f"Preprocess.crop ({self.crop}) must be <= resize ({self.resize}): the crop is "
                             "taken from the resized image")
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocess.channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.crop, self.crop, self.channels)

    def to_json(self) -> dict:
        return {"resize_shorter": int(self.resize), "center_crop": int(self.crop), "channels": int(self.channels),
                "interpolation": "bilinear (Pillow, antialiased)"}

    def __call__(self, image) -> np.ndarray:
        """``image`` (a PIL image, or a uint8 (H, W[, C]) array) -> uint8 (crop, crop, channels)."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            a = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
            image = Image.fromarray(np.ascontiguousarray(a))
        mode = "L" if self.channels == 1 else "RGB"
        im = image if image.mode == mode else image.convert(mode)
        w, h = im.size
        if w <= h:
            size = (self.resize, int(self.resize * h / w))
        else:
            size = (int(self.resize * w / h), self.resize)
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
        w, h = im.size
        left, top = int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))
        if (left, top, w, h) != (0, 0, self.crop, self.crop):
            im = im.crop((left, top, left + self.crop, top + self.crop))
        out = np.frombuffer(im.tobytes(), np.uint8)
        return out.reshape(self.crop, self.crop, self.channels)


def preprocess_for(model_name: str, input_shape, resize: int | None = None, crop: int | None = None) -> Preprocess:
    """The model card's transform for ``model_name`` with input ``(H, W, C)``; ``resize``/``crop`` override it.

    ImageNet-sized inputs (224) use shorter side 256; any other model resizes
    straight to its input size.  An override of ``crop`` must still equal the
    model's input size for routing to work; that is checked where data meets
    the model (:func:`jaxroute.models.gated.check_dataset_fits`).
    """
    h, w, c = (int(d) for d in input_shape)
    if h != w:
        raise ValueError(f"model {model_name} has a non-square input {h}x{w}; a centre crop needs a square one")
    default_resize = IMAGENET_RESIZE if h == 224 else h
    crop = h if crop is None else crop
    if resize is None:
        # keep the card's resize-to-crop ratio for a user crop (256/224 for ImageNet models)
        resize = default_resize if crop == h else max(crop, int(round(crop * default_resize / h)))
    return Preprocess(int(resize), int(crop), c)
