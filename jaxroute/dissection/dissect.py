"""Network dissection (Bau et al. 2017) of any gate point of a :class:`~jaxroute.models.GatedModel`.

The method, with NetDissect-Lite's choices where the paper is silent:

1. **Activations.** ``A_k(x)``: unit k's map at a gate point (``GatedModel.capture``),
   on every concept image (optionally transformed first, e.g. by an attack).
2. **Thresholds.** ``T_k`` with ``P(a_k > T_k) = q`` (``q = 0.005``) over every
   image and position of the *raw* (low-resolution) maps, as NetDissect-Lite
   takes it.  Computed exactly: ``np.quantile(values, 1 - q)`` (linear
   interpolation), from a streaming per-unit top-k of the ``q·N + 2`` largest
   values, kept on the host (:class:`StreamingTopK`), so memory is bounded by
   the top-k, not the data set.  Lite uses
   an approximate quantile sketch; this is the exact value it approximates.
3. **Upsampling.** ``S_k``: bilinear upsampling to the mask size ``sh x sw``,
   the way Lite's ``scipy.misc.imresize(mode="F")`` does it (Pillow's float
   ``BILINEAR``: half-pixel centres, triangle weights normalised over the
   pixels inside the image), which ``jax.image.resize`` with ``antialias``
   computes (checked against Pillow; :func:`pillow_bilinear_weights` is
   Pillow's coefficient rule written out, the reference).
4. **Masks and tally.** ``M_k = S_k > T_k`` (``compare=">"``, Lite) or ``>=``
   (Bau's formula); counts per unit x label accumulated as matmuls in one
   jitted batched function (:func:`tally_batch`).
5. **IoU and detectors.** ``IoU_{k,c} = Σ|M_k ∩ L_c| / Σ|M_k ∪ L_c|``; each label
   has one primary category; a unit takes each category's best label, then
   the best category; it is a detector if its IoU > ``iou_threshold`` (0.04,
   Lite's ``SCORE_THRESHOLD``).

``rules="lite"`` (default) follows NetDissect-Lite's ``tally_job``:

* images where a unit's maximum is not above ``T_k`` add nothing for it;
* a pixel label's area is its pixel count; an image-level label counts the
  whole image (``sh·sw``) as its area and the unit's whole mask as the
  intersection;
* the union counts a unit's mask area only on images where the label's
  primary category occurs under that mask (an image-level label's category
  always does);
* a label's primary category is the one whose ``c_<cat>.csv`` gives it the
  largest coverage (ties: the later category).

Deviation: Lite's loop carries the previous unit's category counts into an
image that has only image-level labels (a stale variable); here such an
image starts from zero.

``rules="bau"``: the paper's formula, union ``Σ(|M_k| + |L_c| − |M_k ∩ L_c|)``
over all images, with the same per-category selection.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.dissection.broden import Broden
from jaxroute.utils.checks import check_int

RULES = ("lite", "bau")
COMPARES = (">", ">=")


@dataclasses.dataclass(frozen=True)
class DissectConfig:
    """Dissection settings (defaults: NetDissect-Lite's ``QUANTILE``, ``SCORE_THRESHOLD`` and rules).

    ``compare``: ``">"`` or ``">="`` for both the mask and the image's max test;
    ``None`` picks the rules' own (Lite ``>``, Bau ``>=``).  ``batch_size``:
    images per compiled batch.
    """

    quantile: float = 0.005
    iou_threshold: float = 0.04
    rules: str = "lite"
    compare: str | None = None
    batch_size: int = 64

    def __post_init__(self):
        q = self.quantile
        if not isinstance(q, (int, float)) or isinstance(q, bool) or not math.isfinite(q) or not 0 < q < 1:
            raise ValueError(f"quantile must be a number in (0, 1), got {q!r}")
        t = self.iou_threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or not 0 <= t < 1:
            raise ValueError(f"iou_threshold must be a number in [0, 1), got {t!r}")
        if self.rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {self.rules!r}")
        if self.compare is not None and self.compare not in COMPARES:
            raise ValueError(f"compare must be one of {COMPARES} or None, got {self.compare!r}")
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size"))   # a Python int

    @property
    def comparison(self) -> str:
        return self.compare or (">" if self.rules == "lite" else ">=")


# --------------------------------------------------------------------------- upsampling

def pillow_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of Pillow's BILINEAR resize along one axis.

    Pillow's ``precompute_coeffs``: scale = n_in / n_out, filter scale
    max(scale, 1) (antialiasing when shrinking), support 1·filter scale, output
    pixel i centred at (i + 0.5)·scale, triangle weights over the input
    pixels in ``[int(c − support + 0.5), int(c + support + 0.5))`` clipped to
    the image, normalised to sum 1.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 1.0 * fscale
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for x in range(lo, hi):
            w[i, x] = max(0.0, 1.0 - abs((x - center + 0.5) / fscale))
        total = w[i].sum()
        if total != 0:
            w[i] /= total
    return w


def upsample_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Pillow-BILINEAR resize of NHWC maps (B, h, w, U) to (B, U, sh, sw).

    ``jax.image.resize(..., "bilinear", antialias=True)`` computes Pillow's
    coefficients (:func:`pillow_bilinear_weights`) up to float rounding
    (≤ 1e-6 on upsampling and on shrinking; without ``antialias`` shrinking
    differs), at full float32 matmul precision.
    """
    b, _, _, u = maps.shape
    up = jax.image.resize(maps, (b, size[0], size[1], u), "bilinear", antialias=True)
    return jnp.moveaxis(up, -1, 1)


# --------------------------------------------------------------------------- activations

def as_maps(a: jax.Array) -> jax.Array:
    """A gate point's activation as NHWC maps: (B, U) dense activations become 1x1 maps."""
    return a[:, None, None, :] if a.ndim == 2 else a


def activation_fn(model, layers: Sequence[str], transform: Callable | None = None) -> Callable:
    """Jitted ``x -> {layer: (B, h, w, U) maps}`` at the given gate points, after ``transform(x)`` if given."""
    layers = model.spec.check_points(layers)

    @jax.jit
    def acts(x):
        if transform is not None:
            x = transform(x)
        cap = model.capture(x)
        return {l: as_maps(cap.acts[l]) for l in layers}

    return acts


# --------------------------------------------------------------------------- thresholds

def topk_size(n: int, quantile: float) -> int:
    """How many of the largest values determine ``np.quantile(values, 1 - quantile)`` of n values."""
    pos = _virtual_index(n, 1.0 - quantile)
    return int(min(n, n - math.floor(pos)))


def _virtual_index(n: int, q: float) -> float:
    # numpy's "linear" method, written as numpy writes it, so the interpolation weight is bit-identical
    return (n - 1) * q


class StreamingTopK:
    """The k largest values of each of U streams, exactly, on the host.

    Each unit keeps the values above its running k-th largest ("floor") and is
    cut back to its k largest (``np.partition``) when it holds 2k, so a batch
    costs one comparison per value; a device top-k over the k + batch values
    would re-sort hundreds of thousands of values per unit every batch (k = q·N
    is 0.5 % of every position of every image).  A value equal to the floor is
    skipped: it cannot change the values of the top k.
    """

    def __init__(self, units: int, k: int):
        self.k = int(k)
        self.parts: list[list[np.ndarray]] = [[] for _ in range(units)]
        self.count = np.zeros(units, np.int64)
        self.floor = np.full(units, -np.inf, np.float32)

    def add(self, values: np.ndarray) -> None:
        """Merge (U, m) values."""
        for u, v in enumerate(np.asarray(values)):
            v = v[v > self.floor[u]]
            if v.size:
                self.parts[u].append(v)
                self.count[u] += v.size
                if self.count[u] >= 2 * self.k:
                    self._cut(u)

    def _cut(self, u: int) -> None:
        v = np.concatenate(self.parts[u]) if self.parts[u] else np.zeros(0, np.float32)
        if v.size > self.k:
            v = np.partition(v, v.size - self.k)[v.size - self.k:]
        self.parts[u], self.count[u] = [v], v.size
        if v.size >= self.k:
            self.floor[u] = v.min()

    def values(self) -> np.ndarray:
        """(U, k), each row descending (-inf where a unit saw fewer than k values)."""
        out = np.full((len(self.parts), self.k), -np.inf, np.float32)
        for u in range(len(self.parts)):
            self._cut(u)
            v = np.sort(self.parts[u][0])[::-1]
            out[u, :v.size] = v
        return out


def quantile_from_topk(top: np.ndarray, n: int, quantile: float) -> np.ndarray:
    """``np.quantile(values, 1 - quantile)`` per unit from its (descending) top-k of n values (float64)."""
    top = np.asarray(top, np.float64)
    q = 1.0 - quantile
    pos = _virtual_index(n, q)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a, b = top[:, n - 1 - lo], top[:, n - 1 - hi]
    t = np.float64(pos - lo)
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def unit_thresholds(acts: Callable, batches: Iterable, n_images: int, quantile: float) -> dict[str, np.ndarray]:
    """Per-layer per-unit ``T_k`` over every image and position; ``batches`` yields padded
    ``(x, valid)`` image batches, ``acts`` is :func:`activation_fn`'s function."""
    tops, sizes = {}, {}
    for x, valid in batches:
        maps = acts(jnp.asarray(x))
        keep = np.asarray(valid, bool)
        for layer, m in maps.items():
            m = np.asarray(m)[keep]  # the maps come to the host once: the running top-k lives there
            if layer not in tops:
                sizes[layer] = n_images * m.shape[1] * m.shape[2]
                tops[layer] = StreamingTopK(m.shape[-1], topk_size(sizes[layer], quantile))
            tops[layer].add(np.moveaxis(m, -1, 0).reshape(m.shape[-1], -1))
    return {l: quantile_from_topk(t.values(), sizes[l], quantile) for l, t in tops.items()}


# --------------------------------------------------------------------------- tally

@dataclasses.dataclass(frozen=True, eq=False)
class Tally:
    """Counts over the data set (float64, integer-valued).

    ``labels`` (L,): each label's area; ``units`` (U,): each unit's mask area;
    ``both`` (U, L): intersections; ``units_cat`` (U, C): a unit's mask area on
    images where the category occurs under its mask (Lite's rule; None for Bau's);
    ``image_max`` (N, U): each image's maximum activation per unit, in data order
    (what ranks a unit's top images), when recorded.
    """

    labels: np.ndarray
    units: np.ndarray
    both: np.ndarray
    units_cat: np.ndarray | None
    image_max: np.ndarray | None = None

    def __add__(self, other: "Tally") -> "Tally":
        uc = None if self.units_cat is None else self.units_cat + other.units_cat
        im = (None if self.image_max is None or other.image_max is None
              else np.concatenate([self.image_max, other.image_max]))
        return Tally(self.labels + other.labels, self.units + other.units, self.both + other.both, uc, im)


@functools.partial(jax.jit, static_argnames=("size", "rules", "compare"))
def tally_batch(maps, thresholds, pixels, scalars, valid, labelcat, *, size, rules="lite", compare=">"):
    """Counts of one batch, as matmuls.

    ``maps`` (B, h, w, U) raw activations; ``thresholds`` (U,); ``pixels``
    (B, K, sh·sw) int pixel-label maps (0 = none, K masks per image, zero-padded);
    ``scalars`` (B, L) counts of image-level labels; ``valid`` (B,) bool;
    ``labelcat`` (L, C) one-hot primary categories.  Returns a dict of the
    batch's ``labels``, ``units``, ``both`` (and ``units_cat`` for Lite).
    Counts are float32 integers: exact while a batch's counts stay < 2**24.
    Memory: the pixel labels enter as one-hot (B, sh·sw, L) floats, fine for
    a few dozen labels; for Broden's ~1,200 labels at 112² choose a small batch.
    """
    cmp = jnp.greater if compare == ">" else jnp.greater_equal
    f32 = jnp.float32
    n_labels = labelcat.shape[0]
    v = valid.astype(f32)
    t = thresholds.astype(maps.dtype)
    up = upsample_bilinear(maps, size)                                    # (B, U, sh, sw)
    active = cmp(maps.max(axis=(1, 2)), t) & valid[:, None]              # (B, U)
    mask = (cmp(up, t[None, :, None, None]) & active[:, :, None, None]).astype(f32)
    mask = mask.reshape(mask.shape[0], mask.shape[1], -1)                 # (B, U, HW)
    onehot = jax.nn.one_hot(pixels, n_labels, dtype=f32).sum(axis=1)      # (B, HW, L)
    onehot = onehot.at[..., 0].set(0.0) * v[:, None, None]
    scal = scalars.astype(f32) * v[:, None]
    area = mask.sum(-1)                                                   # (B, U)
    hp = jax.lax.Precision.HIGHEST
    both_px = jnp.einsum("buh,bhl->bul", mask, onehot, precision=hp)     # (B, U, L)
    out = {
        "labels": onehot.sum(axis=(0, 1)) + scal.sum(0) * (size[0] * size[1]),
        "units": area.sum(0),
        "both": both_px.sum(0) + jnp.einsum("bu,bl->ul", area, scal, precision=hp),
    }
    if rules == "lite":
        lc = labelcat.astype(f32)
        hits = (jnp.einsum("bul,lc->buc", both_px, lc, precision=hp)
                + jnp.einsum("bl,lc->bc", scal, lc, precision=hp)[:, None, :]) > 0
        out["units_cat"] = jnp.einsum("bu,buc->uc", area, hits.astype(f32), precision=hp)
    return out


def labelcat_matrix(broden: Broden) -> np.ndarray:
    """(L, C) one-hot of each label's primary category (Lite's ``labelcat``)."""
    primary = broden.primary_categories()
    return np.eye(len(broden.categories))[primary]


def label_batches(broden: Broden, batch_size: int, start: int = 0, end: int | None = None) -> Iterator[dict]:
    """Padded batches of a Broden folder: ``images`` uint8 (B, ih, iw, 3), ``pixels`` int32 (B, K, sh·sw),
    ``scalars`` float32 (B, L) counts, ``valid`` (B,) bool, ``n_valid``.  K is the most masks any image
    of the batch has (at least 1); images are decoded one at a time."""
    sh, sw = broden.mask_shape()
    ih, iw = broden.image_shape()
    L = broden.num_labels
    end = len(broden) if end is None else end
    recs = broden.records(start, end)
    while True:
        # islice, not next(): a StopIteration inside a generator is a RuntimeError since Python 3.7
        rows = list(itertools.islice(recs, batch_size))
        if not rows:
            return
        k = max([1] + [sum(len(ms) for ms in r.masks.values()) for r in rows])
        images = np.zeros((batch_size, ih, iw, 3), np.uint8)
        pixels = np.zeros((batch_size, k, sh * sw), np.int32)
        scalars = np.zeros((batch_size, L), np.float32)
        for i, r in enumerate(rows):
            images[i] = r.image
            masks = [m for cat in broden.categories for m in r.masks.get(cat, ())]
            for j, m in enumerate(masks):
                pixels[i, j] = m.reshape(-1)
            for cat in broden.categories:
                for n in r.scalars.get(cat, ()):
                    scalars[i, n] += 1
        valid = np.arange(batch_size) < len(rows)
        yield {"images": images, "pixels": pixels, "scalars": scalars, "valid": valid, "n_valid": len(rows)}


def to_unit_float(images: np.ndarray) -> np.ndarray:
    from jaxroute.data.stored import unit_float

    return unit_float(images)


def tally_layers(acts: Callable, broden: Broden, thresholds: Mapping[str, np.ndarray],
                 config: DissectConfig) -> dict[str, Tally]:
    """Tally every layer of ``acts`` over the whole Broden folder with the given thresholds."""
    size = broden.mask_shape()
    labelcat = jnp.asarray(labelcat_matrix(broden), jnp.float32)
    totals: dict[str, Tally] = {}
    for b in label_batches(broden, config.batch_size):
        maps = acts(jnp.asarray(to_unit_float(b["images"])))
        for layer, m in maps.items():
            r = tally_batch(m, jnp.asarray(thresholds[layer], jnp.float32), jnp.asarray(b["pixels"]),
                            jnp.asarray(b["scalars"]), jnp.asarray(b["valid"]), labelcat, size=size,
                            rules=config.rules, compare=config.comparison)
            r = {k: np.asarray(v, np.float64) for k, v in jax.device_get(r).items()}
            image_max = np.asarray(m.max(axis=(1, 2)))[:b["n_valid"]]
            t = Tally(r["labels"], r["units"], r["both"], r.get("units_cat"), image_max)
            totals[layer] = t if layer not in totals else totals[layer] + t
    return totals


# --------------------------------------------------------------------------- scores

@dataclasses.dataclass(frozen=True, eq=False)
class LayerResult:
    """One layer's dissection: thresholds, tally, IoU and each unit's best concept."""

    layer: str
    thresholds: np.ndarray         # (U,) float64
    tally: Tally
    iou: np.ndarray                # (U, L)
    cat_label: np.ndarray          # (C, U) each category's best label per unit
    cat_score: np.ndarray          # (C, U) its IoU
    best_cat: np.ndarray           # (U,) the unit's best category
    score: np.ndarray              # (U,) its IoU
    union_units: np.ndarray        # (U, L) the unit's area counted in each union
    categories: tuple[str, ...]
    label_names: tuple[str, ...]
    iou_threshold: float

    @property
    def label(self) -> np.ndarray:
        return self.cat_label[self.best_cat, np.arange(len(self.best_cat))]

    @property
    def detectors(self) -> np.ndarray:
        return self.score > self.iou_threshold

    def summary(self) -> dict:
        det = self.detectors
        by_cat = {c: int(np.sum(det & (self.best_cat == i))) for i, c in enumerate(self.categories)}
        return {"units": int(len(det)), "detectors": int(det.sum()), "detector_ratio": float(det.mean()),
                "by_category": by_cat, "unique_concepts": int(len(set(self.label[det].tolist())))}


def union_units(tally: Tally, labelcat: np.ndarray, rules: str) -> np.ndarray:
    """(U, L) the unit's mask area that enters the union with each label."""
    if rules == "lite":
        return tally.units_cat @ labelcat.T
    return np.broadcast_to(tally.units[:, None], tally.both.shape)


def iou_matrix(tally: Tally, labelcat: np.ndarray, rules: str) -> np.ndarray:
    """(U, L) IoU; Lite's denominator carries its +1e-10."""
    return tally.both / (union_units(tally, labelcat, rules) + tally.labels[None, :] - tally.both + 1e-10)


def score_layer(layer: str, thresholds: np.ndarray, tally: Tally, broden: Broden, config: DissectConfig) -> LayerResult:
    """IoU, each category's best label per unit, and the best category (NetDissect-Lite's selection)."""
    labelcat = labelcat_matrix(broden)
    iou = iou_matrix(tally, labelcat, config.rules)
    primary = broden.primary_categories()
    C = len(broden.categories)
    pciou = np.stack([iou * (primary == c)[None, :] for c in range(C)])     # (C, U, L)
    cat_label = pciou.argmax(axis=2)
    cat_score = np.take_along_axis(pciou, cat_label[:, :, None], axis=2)[:, :, 0]
    # Lite: score_pciou.argsort(axis=0)[::-1][0]; a stable sort makes its tie rule explicit (later category)
    best_cat = np.argsort(cat_score, axis=0, kind="stable")[::-1][0]
    score = cat_score[best_cat, np.arange(iou.shape[0])]
    return LayerResult(layer, np.asarray(thresholds, np.float64), tally, iou, cat_label, cat_score, best_cat, score,
                       union_units(tally, labelcat, config.rules), broden.categories, tuple(broden.label_names()), config.iou_threshold)


def dissect(model, broden: Broden, layers: Sequence[str], config: DissectConfig = DissectConfig(), *,
            transform: Callable | None = None, thresholds: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, LayerResult]:
    """Dissect gate points ``layers`` of ``model`` on the concept images of ``broden``.

    ``transform``: a pure ``x -> x'`` applied to each (pixel-space) image batch
    before the forward pass, e.g. an attack; deterministic, since the
    threshold and tally passes each apply it.  ``thresholds``: {layer: (U,)}
    to reuse (e.g. clean thresholds for adversarial images); None recomputes.
    """
    layers = model.spec.check_points(layers)
    ih, iw = broden.image_shape()
    if (ih, iw, 3) != tuple(model.input_shape):
        raise ValueError(f"concept images are {ih}x{iw}x3, {model.name} takes {model.input_shape}")
    acts = activation_fn(model, layers, transform)
    if thresholds is None:
        batches = ((to_unit_float(b["images"]), b["valid"]) for b in label_batches(broden, config.batch_size))
        thresholds = unit_thresholds(acts, batches, len(broden), config.quantile)
    else:
        missing = [l for l in layers if l not in thresholds]
        if missing:
            raise ValueError(f"no thresholds given for layer {missing[0]!r}")
        for l in layers:
            units = model.spec.channels[model.spec.names.index(l)]
            if np.shape(thresholds[l]) != (units,):
                raise ValueError(f"thresholds for {l!r} must have shape ({units},), got {np.shape(thresholds[l])}")
    tallies = tally_layers(acts, broden, thresholds, config)
    return {l: score_layer(l, thresholds[l], tallies[l], broden, config) for l in layers}


# --------------------------------------------------------------------------- output

def tally_rows(result: LayerResult) -> list[dict]:
    """Per-unit rows like NetDissect-Lite's ``tally.csv``, best score first (units numbered from 1):
    for each category its best label, the label's area (``truth``), the unit's area counted in
    the union (``activation``), the intersection and the IoU."""
    t = result.tally
    names = result.label_names
    rows = []
    for u in np.argsort(result.score, kind="stable")[::-1]:
        c = int(result.best_cat[u])
        row = {"unit": int(u) + 1, "category": result.categories[c], "label": names[int(result.cat_label[c, u])],
               "score": float(result.score[u])}
        for ci, cat in enumerate(result.categories):
            lab = int(result.cat_label[ci, u])
            row.update({f"{cat}-label": names[lab], f"{cat}-truth": float(t.labels[lab]),
                        f"{cat}-activation": float(result.union_units[u, lab]), f"{cat}-intersect": float(t.both[u, lab]),
                        f"{cat}-iou": float(result.cat_score[ci, u])})
        rows.append(row)
    return rows


def tally_csv(result: LayerResult) -> str:
    import csv
    import io

    rows = tally_rows(result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
