"""An offline CIFAR-10 concept set in Broden format (a substitute for Broden, which is not available offline).

=========================  =====================================================  ======================
Broden category            substitute                                              covered
=========================  =====================================================  ======================
color (11 labels, pixel)   every pixel named by van de Weijer et al.'s 11 colour   yes, exact: the 32³
                           terms through the 32³ table Broden was labelled with    table itself
texture (47, image-level)  generated images for the 11 DTD names with a            partly: 11 of 47,
                           geometric definition                                    synthetic
object (584, pixel)        the CIFAR-10 class as an image-level label              partly
part, material, scene      nothing offline                                         no
=========================  =====================================================  ======================

The colour table is read from where it is kept (``w2color.npy``, a (32, 32, 32)
uint8 array; a pixel (r, g, b) is named ``COLOR_NAMES[table[r // 8, g // 8, b // 8]]``),
never copied.  Texture images get the colour masks too (every pixel of every
image is named), their texture as an image-level label, and no object.

Every image, CIFAR or generated, goes through :func:`concept_records` and
:func:`~jaxroute.dissection.broden.write_broden` (one code path).

An image-level label on a fraction ``f`` of all pixels caps the IoU of a unit
firing on a fraction ``q`` of all positions at about ``q / f``
(:func:`iou_caps`): 0.05 for one of ten equally frequent CIFAR classes at
q = 0.005.  Since the model was trained on those classes, object "concepts"
here are partly circular: a unit that detects a class is expected.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxroute.dissection.broden import Broden, Record, write_broden

COLOR_NAMES = ("black", "blue", "brown", "grey", "green", "orange", "pink", "purple", "red", "white", "yellow")
TEXTURE_NAMES = ("banded", "striped", "lined", "chequered", "grid", "dotted", "polka-dotted", "crosshatched",
                 "zigzagged", "spiralled", "honeycombed")
CATEGORIES = ("object", "texture", "color")  # NetDissect-Lite's order, restricted to what exists here


def load_color_table(path) -> np.ndarray:
    """The (32, 32, 32) colour-name table, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"colour-name table {path} is missing (w2color.npy, see its README)")
    table = np.load(path)
    if table.shape != (32, 32, 32) or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{path}: expected a (32, 32, 32) integer table, got {table.dtype} {table.shape}")
    if table.min() < 0 or table.max() >= len(COLOR_NAMES):
        raise ValueError(f"{path}: entries must index the {len(COLOR_NAMES)} colour names, got "
                         f"[{table.min()}, {table.max()}]")
    return table


def color_index(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) colour-name index (0..10) of every pixel of a uint8 RGB image."""
    q = np.asarray(image, np.uint8) // 8
    return table[q[..., 0], q[..., 1], q[..., 2]].astype(np.int32)


# --------------------------------------------------------------------------- textures

def _two_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A foreground and background colour with enough luminance contrast to show the pattern."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
        if abs(lum(a) - lum(b)) > 60:
            return a.astype(np.uint8), b.astype(np.uint8)


def texture_pattern(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) foreground pattern of DTD texture ``name`` with random
    period, phase and orientation (the geometric definition of each name)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    theta = rng.uniform(0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta)       # coordinate across the stripes
    v = -x * math.sin(theta) + y * math.cos(theta)
    ph = rng.uniform(0, 1)
    if name == "banded":          # few wide bands
        p = rng.uniform(12, 20)
        return ((u / p + ph) % 1.0) < 0.5
    if name == "striped":         # many narrow stripes of equal width
        p = rng.uniform(4, 7)
        return ((u / p + ph) % 1.0) < 0.5
    if name == "lined":           # thin lines on a plain ground
        p = rng.uniform(5, 9)
        return ((u / p + ph) % 1.0) < 1.2 / p
    if name == "chequered":       # alternating squares
        p = rng.uniform(4, 9)
        return ((np.floor(u / p + ph) + np.floor(v / p + ph)) % 2) == 0
    if name == "grid":            # thin lines in two perpendicular directions
        p = rng.uniform(5, 9)
        w = 1.2 / p
        return (((u / p + ph) % 1.0) < w) | (((v / p + ph) % 1.0) < w)
    if name in ("dotted", "polka-dotted"):
        p = rng.uniform(4, 6) if name == "dotted" else rng.uniform(8, 12)
        r = 0.9 if name == "dotted" else rng.uniform(0.25, 0.35) * p
        du = ((u / p + ph) % 1.0 - 0.5) * p
        dv = ((v / p + ph) % 1.0 - 0.5) * p
        return du ** 2 + dv ** 2 <= r ** 2
    if name == "crosshatched":    # two families of thin oblique lines
        p = rng.uniform(5, 8)
        w = 1.2 / p
        a = (x + y) / math.sqrt(2)
        b = (x - y) / math.sqrt(2)
        return (((a / p + ph) % 1.0) < w) | (((b / p + ph) % 1.0) < w)
    if name == "zigzagged":       # lines whose offset is a triangle wave along them
        p = rng.uniform(6, 10)
        lam, amp = rng.uniform(6, 12), rng.uniform(2, 4)
        tri = amp * (2 * np.abs((v / lam + ph) % 1.0 - 0.5) * 2 - 1)
        return (((u + tri) / p + ph) % 1.0) < 2.0 / p
    if name == "spiralled":       # an Archimedean spiral about a random centre
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = np.hypot(x - cx, y - cy)
        phi = np.arctan2(y - cy, x - cx)
        p = rng.uniform(4, 7)
        return (((r / p - phi / (2 * math.pi)) + ph) % 1.0) < 0.4
    if name == "honeycombed":     # hexagonal cell borders
        p = rng.uniform(5, 8)
        # distance to the nearest centre of a hexagonal lattice minus distance to the second nearest
        cx = np.arange(-2, size / p + 3)
        pts = [(i * p * math.sqrt(3) + (j % 2) * p * math.sqrt(3) / 2, j * p * 1.5) for i in cx for j in cx]
        pts = np.asarray(pts) + rng.uniform(0, p, 2)
        d = np.sort(np.hypot(x[..., None] - pts[:, 0], y[..., None] - pts[:, 1]), axis=-1)
        return (d[..., 1] - d[..., 0]) < 1.2
    raise ValueError(f"unknown texture {name!r}; known: {TEXTURE_NAMES}")


def texture_image(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    fg, bg = _two_colors(rng)
    pat = texture_pattern(name, size, rng)
    return np.where(pat[..., None], fg, bg).astype(np.uint8)


# --------------------------------------------------------------------------- the concept set

def label_table(class_names: Sequence[str]) -> tuple[list[tuple[int, str]], dict[str, dict[str, int]]]:
    """Label numbers: colours 1..11, textures 12..22, object classes from 23 (Broden numbers from 1)."""
    numbers: dict[str, dict[str, int]] = {"color": {}, "texture": {}, "object": {}}
    n = 1
    for cat, names in (("color", COLOR_NAMES), ("texture", TEXTURE_NAMES), ("object", class_names)):
        for name in names:
            numbers[cat][name] = n
            n += 1
    labels = [(num, name) for cat in ("color", "texture", "object") for name, num in numbers[cat].items()]
    return labels, numbers


def concept_records(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], table: np.ndarray, *,
                    textures_per_name: int, seed: int = 0, split: str = "test") -> Iterator[Record]:
    """The concept set's records: each data-set image (colour mask + its class as an image-level
    object label), then ``textures_per_name`` generated images per texture name (colour mask +
    texture label).  ``images`` uint8 (N, H, W, 3)."""
    _, numbers = label_table(class_names)
    color_numbers = np.asarray([numbers["color"][c] for c in COLOR_NAMES], np.int32)
    for img, y in zip(images, labels):
        yield Record(img, {"color": [color_numbers[color_index(img, table)]]},
                     {"object": [numbers["object"][class_names[int(y)]]]}, split)
    size = images.shape[1] if len(images) else 32
    rng = np.random.default_rng(seed)
    for k in range(textures_per_name):
        for name in TEXTURE_NAMES:
            img = texture_image(name, size, rng)
            yield Record(img, {"color": [color_numbers[color_index(img, table)]]},
                         {"texture": [numbers["texture"][name]]}, split)


def build_concepts(out, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], table_path, *,
                   textures_per_name: int | None = None, seed: int = 0, split: str = "test") -> Broden:
    """Write the concept set as a Broden folder at ``out`` (see the module docstring).

    ``textures_per_name`` defaults to the mean number of images per class, so a
    texture is about as frequent as a class.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 RGB (N, H, W, 3), got {images.dtype} {images.shape}")
    if textures_per_name is None:
        textures_per_name = max(1, round(len(images) / max(1, len(class_names))))
    if textures_per_name < 0:
        raise ValueError(f"textures_per_name must be >= 0, got {textures_per_name}")
    table = load_color_table(table_path)
    label_list, _ = label_table(class_names)
    recs = concept_records(images, labels, class_names, table, textures_per_name=textures_per_name, seed=seed,
                           split=split)
    return write_broden(out, recs, label_list, CATEGORIES)


def iou_caps(broden: Broden, quantile: float = 0.005) -> list[dict]:
    """For each image-level label: its fraction f of all pixels and the IoU cap q / f (capped at 1)."""
    sh, sw = broden.mask_shape()
    total = len(broden) * sh * sw
    counts: dict[int, int] = {}
    for row in broden.index:
        for cat in broden.categories:
            for item in (row.get(cat) or "").split(";"):
                if item.strip().isdigit():
                    counts[int(item)] = counts.get(int(item), 0) + sh * sw
    names = broden.label_names()
    out = []
    for n in sorted(counts):
        f = counts[n] / total
        out.append({"label": names[n], "number": n, "fraction": f, "cap": min(1.0, quantile / f)})
    return out


def group_cap(fraction: float, quantile: float = 0.005) -> float:
    """The IoU cap q / f of an image-level label covering fraction f (e.g. a WordNet group of classes)."""
    return min(1.0, quantile / fraction)
