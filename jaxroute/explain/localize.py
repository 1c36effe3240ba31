"""Weakly supervised localization of saliency maps on paste sets, full weights vs class subnetworks.

The protocol of Table 1 of Wang, Hu, Su (arXiv:1910.02673), after Fong &
Vedaldi (ICCV 2017): explain each image's class with a saliency method, keep
the pixels >= α·mean of the map, take the tight box around them, count an
error when its IoU with the object's box is below 0.5; α* is tuned on the grid
{0, 0.5, ..., 10} on training images and the error measured on test images
(:mod:`jaxroute.explain.localization`).  Every method runs twice: with full
weights, and under the explained class's subnetwork (``subnets[c]``, one gate
vector per class, :func:`jaxroute.explain.class_gates`).

Deviations, and why:

* The paper uses ImageNet boxes; CIFAR-10 has none, so the images are
  canvases of the paste set (:mod:`jaxroute.data.paste`): a 2x2 mosaic of
  images of other classes with the class image pasted at a uniform offset,
  the box its square.  A canvas is twice the image size in each axis (64x64
  for 32x32 CIFAR images), so the model must accept inputs of that size: the
  global-pooling ResNets (and the digits CNN) do; a model whose classifier
  flattens a fixed spatial size (the CIFAR VGG-16) is refused.
* α* is tuned on ``n_train`` canvases built from the training images (the
  paper: 5,000 images; default here 1,000) and the error measured on
  ``n_test`` canvases built from the test images (default 2,000).
* The explained class is the pasted image's label (the localization protocol's
  target), not the prediction.

Randomness: ``key`` splits into the training canvases', the test canvases' and
SmoothGrad's keys.  SmoothGrad's noise for canvas i is drawn from
``fold_in(noise_key, i)`` (training canvases 0..n_train-1, test canvases
after them), the same noise for full weights and the subnetwork, so the two
differ only by the gates.

Resume: with ``cache_dir``, each method and weights keeps the per-canvas
scores (:func:`~jaxroute.explain.localization.canvas_scores`: the error at every
α and the energy in box, a few hundred bytes a canvas) of every ``chunk``
canvases in ``cache_dir/<method>-<variant>/`` as soon as they are computed,
beside the arguments they depend on (``config.json``: model weights, gates,
canvases and boxes, key, counts, method config; a folder of other arguments
is refused).
A killed run started again explains only the canvases it had not finished,
with the same result.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.data.paste import paste_set
from jaxroute.explain.job import explanation_outputs
from jaxroute.explain.localization import canvas_scores, evaluate_scores
from jaxroute.explain.methods import METHODS, NEEDS_KEY, method_config
from jaxroute.utils.checks import check_int
from jaxroute.utils.devices import map_batches
from jaxroute.utils.io import atomic_save_npz


def check_methods(methods) -> list[str]:
    """The method names as a list: non-empty, known, each once."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown saliency method(s) {unknown or methods}; one or more of {sorted(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"a saliency method is named twice: {methods}")
    return methods


def canvas_shape(model, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """The (H, W, C) of the paste-set canvases of ``image_hw`` images (a 2x2 mosaic), after checking that
    ``model`` accepts them; ValueError naming the model when it does not."""
    h, w = image_hw
    shape = (2 * h, 2 * w, model.input_shape[2])
    from flax.errors import FlaxError

    try:  # traced on shapes only (the variables too, so a model with abstract variables can be checked)
        out = jax.eval_shape(lambda v, x: model.with_variables(v).logits(x), model.variables,
                             jax.ShapeDtypeStruct((1, *shape), jnp.float32))
        problem = None if tuple(out.shape) == (1, model.num_classes) else f"it returns logits of shape {out.shape}"
    except (TypeError, ValueError, FlaxError) as e:  # a layer refusing the input size (a Dense over a flattened map)
        problem = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if problem:
        raise ValueError(f"model {model.name} cannot take the {shape[0]}x{shape[1]} paste-set canvases (a 2x2 "
                         f"mosaic of its {h}x{w} inputs): {problem}; localization needs a model that pools "
                         "globally over space, such as the CIFAR ResNets")
    return shape


def _check_images(model, images, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"{what} images must have shape (N, {', '.join(map(str, model.input_shape))}) for "
                         f"{model.name}, got {images.shape}")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} labels must be {images.shape[0]} integers, got {labels.dtype}{labels.shape}")
    bad = labels[(labels < 0) | (labels >= model.num_classes)]
    if bad.size:
        raise ValueError(f"{what} label {int(bad[0])} is out of range for {model.name} "
                         f"({model.num_classes} classes)")
    return images, labels


def localize(model, train_images, train_labels, test_images, test_labels, *, methods, subnets=None,
             n_train: int = 1000, n_test: int = 2000, key: jax.Array, batch_size: int = 64,
             configs: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
             chunk: int = 250, log: Callable[[str], Any] | None = None) -> dict:
    """Localization error of each saliency method on paste-set canvases, full weights and (with
    ``subnets``) under the pasted class's subnetwork.

    ``train_images``/``test_images`` (N, h, w, C) in [0, 1] with integer labels: the images the
    training canvases (for α*) and the test canvases (for the error) are built from;
    ``methods`` names of :data:`~jaxroute.explain.METHODS`; ``subnets`` (K, D) one gate vector per
    class (row c = class c); ``configs`` ``{method: config}`` (missing: the defaults);
    ``batch_size`` canvases explained at once (jitted, split over the local devices);
    ``cache_dir`` keeps the scores of every ``chunk`` canvases (see the module doc).

    Returns ``{method: {"full": {alpha_star, err, energy_in_box, train_err}, "subnet": {...}}}``
    (``"subnet"`` only with ``subnets``); ``err`` and ``train_err`` in %, ``energy_in_box`` the
    mean fraction of a test map's mass inside the box.
    """
    methods = check_methods(methods)
    n_train, n_test = check_int(n_train, "n_train"), check_int(n_test, "n_test")
    batch_size, chunk = check_int(batch_size, "batch_size"), check_int(chunk, "chunk")
    configs = dict(configs or {})
    unused = sorted(set(configs) - set(methods))
    if unused:
        raise ValueError(f"configs given for methods not run: {unused}")
    configs = {m: method_config(m, configs.get(m)) for m in methods}
    train_images, train_labels = _check_images(model, train_images, train_labels, "training")
    test_images, test_labels = _check_images(model, test_images, test_labels, "test")
    if subnets is not None:
        subnets = np.asarray(subnets, np.float32)
        if subnets.shape != (model.num_classes, model.spec.size):
            raise ValueError(f"subnets must have shape {(model.num_classes, model.spec.size)} (one gate vector "
                             f"per class of {model.name}), got {subnets.shape}")
        if not np.all(np.isfinite(subnets)):
            raise ValueError("subnets hold non-finite gates")
    shape = canvas_shape(model, tuple(model.input_shape[:2]))
    k_train, k_test, k_noise = jax.random.split(key, 3)
    train = paste_set(k_train, train_images, train_labels, n_train, shape[:2])
    test = paste_set(k_test, test_images, test_labels, n_test, shape[:2])
    # one batch shape for both sets (one compilation per method and weights)
    batch = min(batch_size, max(n_train, n_test))
    index_train = np.arange(n_train, dtype=np.int32)
    index_test = np.arange(n_train, n_train + n_test, dtype=np.int32)

    variants = {"full": None} if subnets is None else {"full": None, "subnet": subnets}
    if cache_dir is not None:
        from jaxroute.utils.cache import check_cache_config, fingerprint

        # what every method's cached scores depend on, besides the method's config and gates
        common = {"model": model.name, "weights": fingerprint(jax.tree_util.tree_leaves(model.variables)),
                  "canvases": fingerprint([train.canvases, train.boxes, test.canvases, test.boxes]),
                  "key": np.asarray(jax.random.key_data(key)).tolist(), "n_train": n_train, "n_test": n_test,
                  "canvas_shape": list(shape), "chunk": chunk}
    result: dict[str, dict] = {}
    for method in methods:
        result[method] = {}
        for variant, gates in variants.items():
            outputs = explanation_outputs(model, method, configs[method], subnets=gates, target="label",
                                          key=k_noise if method in NEEDS_KEY else None)
            maps_fn = jax.jit(lambda x, y, i: outputs(x, y, i)["maps"])

            def maps(ps, index):
                return map_batches(lambda _, x, y, i: maps_fn(x, y, i), [ps.canvases, ps.labels, index], batch)

            folder = None
            if cache_dir is not None:
                folder = Path(cache_dir) / f"{method}-{variant}"
                folder.mkdir(parents=True, exist_ok=True)
                check_cache_config(folder, {**common, "gates": None if gates is None else fingerprint([gates]),
                                            "config": dataclasses.asdict(configs[method])})
            parts = [_scores(maps, ps, index, part, folder, chunk, log and (lambda m: log(f"{method} ({variant}) {m}")))
                     for ps, index, part in ((train, index_train, "train"), (test, index_test, "test"))]
            result[method][variant] = evaluate_scores(*parts)
            if log:
                r = result[method][variant]
                log(f"{method} ({variant}): error {r['err']:.2f}% at alpha* {r['alpha_star']:g}, "
                    f"energy in box {r['energy_in_box']:.4f}")
    return result


_canvas_scores = jax.jit(canvas_scores)


def _scores(maps: Callable, ps, index: np.ndarray, part: str, folder: Path | None, chunk: int, log) -> dict:
    """:func:`canvas_scores` of the paste set ``ps``, computed ``chunk`` canvases at a time; with a
    ``folder``, each chunk is read from it when there and saved into it when computed."""
    out = []
    for lo in range(0, len(index), chunk):
        hi = min(lo + chunk, len(index))
        path = None if folder is None else folder / f"{part}-{lo:07d}-{hi:07d}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                out.append({k: z[k] for k in z.files})
            continue
        view = ps._replace(canvases=ps.canvases[lo:hi], labels=ps.labels[lo:hi])
        s = {k: np.asarray(v) for k, v in _canvas_scores(maps(view, index[lo:hi]), ps.boxes[lo:hi]).items()}
        if path is not None:
            atomic_save_npz(path, **s)
        if log and len(index) > chunk:
            log(f"{part} canvases {hi}/{len(index)}")
        out.append(s)
    return {k: np.concatenate([o[k] for o in out]) for k in ("errors", "energy")}
