"""The paste set: images with a known object box, built from a classification set.

CIFAR-10 has no bounding boxes, and no offline package ships a boxed image set,
so weakly supervised localization is measured on composites: a canvas is a
mosaic of images of *other* classes (2x2 of 32x32 images for a 64x64 canvas)
and the image of class c is pasted over it at a uniform random offset
(every offset in [0, canvas - image] in each axis equally likely).  Its box is
the pasted square.  The canvas's label is c, so a saliency map of logit c
should light up the box.

Boxes are integer pixel coordinates ``(top, left, bottom, right)``, half-open:
rows ``top..bottom-1`` and columns ``left..right-1`` (the convention of
:mod:`jaxroute.explain.localization`).

Choices where the protocol leaves room: a canvas's foreground images are
drawn without replacement from the whole set (with replacement only when more
canvases than images are asked for); the background images are independent
uniform draws from the images whose label differs from the foreground's (a
repeated background within one canvas is possible, with probability below
``tiles² / (2·(N - n_c))``).  All randomness comes from the explicit ``key``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.utils.checks import check_int


class PasteSet(NamedTuple):
    canvases: np.ndarray    # (n, Hc, Wc, C) float in [0, 1]
    boxes: np.ndarray       # (n, 4) int32 (top, left, bottom, right), half-open
    labels: np.ndarray      # (n,) int32, the pasted image's class
    source: np.ndarray      # (n,) int64 index of the pasted image
    background: np.ndarray  # (n, tiles) int64 indices of the mosaic images, row-major


def mosaic_grid(image_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """Tiles per column and per row of a canvas of ``canvas_hw`` made of ``image_hw`` images.

    ValueError when the canvas is not a whole number of images in each axis.
    """
    (h, w), (ch, cw) = image_hw, canvas_hw
    if ch < h or cw < w or ch % h or cw % w:
        raise ValueError(f"a {ch}x{cw} canvas cannot be divided into a mosaic of {h}x{w} images; "
                         f"use a canvas whose height and width are multiples of {h} and {w}")
    return ch // h, cw // w


def compose(foreground: jax.Array, tiles: jax.Array, offset: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """One canvas: the (gh*gw, h, w, C) ``tiles`` as a row-major mosaic, ``foreground`` (h, w, C) on top
    with its top-left corner at ``offset`` (2,) ints.  Pure and jittable (``grid`` static); vmap for a batch."""
    gh, gw = grid
    _, h, w, c = tiles.shape
    mosaic = tiles.reshape(gh, gw, h, w, c).transpose(0, 2, 1, 3, 4).reshape(gh * h, gw * w, c)
    return jax.lax.dynamic_update_slice(mosaic, foreground.astype(mosaic.dtype),
                                        (offset[0], offset[1], jnp.zeros((), offset.dtype)))


def draw_paste(key: jax.Array, labels, n: int, image_hw: tuple[int, int], canvas_hw: tuple[int, int]):
    """The random part of a paste set: (source (n,), background (n, tiles), offsets (n, 2)).

    Pure jnp over ``labels`` (N,) ints; jittable with ``n``, the shapes static.
    """
    labels = jnp.asarray(labels)
    num = labels.shape[0]
    gh, gw = mosaic_grid(image_hw, canvas_hw)
    k_src, k_bg, k_off = jax.random.split(key, 3)
    if n <= num:
        source = jax.random.permutation(k_src, num)[:n]
    else:
        source = jax.random.randint(k_src, (n,), 0, num)
    # Other-class images by rank: sort the indices by label; the j-th image not of class c
    # is position j (before the block of c) or j + n_c (after it) in that order.
    order = jnp.argsort(labels, stable=True)
    sorted_labels = labels[order]
    c = labels[source]
    start = jnp.searchsorted(sorted_labels, c, side="left")
    count = jnp.searchsorted(sorted_labels, c, side="right") - start
    u = jax.random.uniform(k_bg, (n, gh * gw))
    j = jnp.minimum(jnp.floor(u * (num - count)[:, None]).astype(jnp.int32), (num - count - 1)[:, None])
    background = order[jnp.where(j < start[:, None], j, j + count[:, None])]
    (h, w), (ch, cw) = image_hw, canvas_hw
    offsets = jax.random.randint(k_off, (n, 2), 0, jnp.array([ch - h + 1, cw - w + 1]))
    return source, background, offsets


def paste_set(key: jax.Array, images, labels, n: int, canvas_size: int | tuple[int, int] = 64) -> PasteSet:
    """``n`` canvases of ``canvas_size`` (an int for square canvases) from ``images`` (N, h, w, C) and ``labels``.

    Canvas i: the mosaic of ``background[i]`` (images of classes other than
    ``labels[i]``), with image ``source[i]`` pasted at ``boxes[i, :2]``.
    Deterministic in ``key``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"need images (N, h, w, C) and labels (N,), got {images.shape} and {labels.shape}")
    check_int(n, "n (the number of canvases)")
    if len(np.unique(labels)) < 2:
        raise ValueError("a paste set needs images of at least two classes (the mosaic is of other classes)")
    canvas_hw = (canvas_size, canvas_size) if np.isscalar(canvas_size) else tuple(canvas_size)
    image_hw = images.shape[1:3]
    grid = mosaic_grid(image_hw, canvas_hw)
    source, background, offsets = jax.jit(draw_paste, static_argnums=(2, 3, 4))(
        key, labels, int(n), tuple(image_hw), tuple(canvas_hw))
    x = jnp.asarray(images)
    canvases = jax.jit(jax.vmap(compose, in_axes=(0, 0, 0, None)), static_argnums=3)(
        x[source], x[background], offsets, grid)
    h, w = image_hw
    offsets = np.asarray(offsets, np.int32)
    boxes = np.concatenate([offsets, offsets + np.array([h, w], np.int32)], axis=1)
    return PasteSet(np.asarray(canvases), boxes, labels[np.asarray(source)].astype(np.int32),
                    np.asarray(source, np.int64), np.asarray(background, np.int64))
