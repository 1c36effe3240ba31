"""Benchmark: Lee et al.'s Mahalanobis detector, jaxroute vs a PyTorch transcription of the reference loop.

    python -m benchmarks.detectors                # full run: 10,000 images (long on 2 CPU cores)
    python -m benchmarks.detectors --quick        # smoke test: 200 images, one repeat
    python -m benchmarks.detectors --images 2000 --repeats 3 --json-out detectors.json

One run measures, on the SAME images (CIFAR-10 JPEG test images from
``../shared/data/cifar10-jpeg/test``, class-interleaved; random images if
absent) and the SAME weights (the shared pretrained ResNet-20, else random):

1. features: the pooled stem and stage outputs of every image and the class
   Gaussians fitted on them (class means, tied covariance);
2. scoring: the Mahalanobis score of every image at every layer with input
   pre-processing, for all seven ε of the reference.

jaxroute: :func:`jaxroute.detection.features.feature_fn` and
:class:`jaxroute.detection.mahalanobis.MahalanobisScorer` (per layer one
batched forward/backward, then one forward over the seven ε stacked).
PyTorch: the reference code's ``sample_estimator`` and
``get_Mahalanobis_score`` transcribed (``pokaxpoka/deep_Mahalanobis_detector``,
``lib_generation.py``): for each ε, for each layer, for each batch of 100 a
forward, a backward and a forward, the distances through
``(f − μ) P (f − μ)ᵀ``'s diagonal as written there.  Both use the cores this
process may run on (``os.sched_getaffinity``: all of them, or those ``taskset
-c`` names): ``torch.set_num_threads`` of that count, and XLA's CPU client
sizes its thread pool from the same affinity mask.
The times are medians over ``--repeats`` after one warm-up: jaxroute's on
every image (it compiles the jitted functions; the kept-channel set of the fit
is a static argument, so the warm-up must see the same images), PyTorch's on
the first batch (it has nothing to compile; one batch warms oneDNN's
primitives for the one batch shape).  The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from benchmarks.machine import cpu_model
from benchmarks.inputs import CHECKPOINTS, cifar_images
from benchmarks.routing import median

EPSILONS = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)
BATCH = 100


# --------------------------------------------------------------------------- PyTorch transcription
def torch_feature_list(model, x):
    """Stem output and the output of every stage (Lee et al.'s ``feature_list``)."""
    import torch.nn.functional as F

    out = F.relu(model.bn1(model.conv1(x)))
    feats = [out]
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            out = block(out)
        feats.append(out)
    return feats


def torch_intermediate_forward(model, x, layer_index):
    return torch_feature_list(model, x)[layer_index]


def torch_sample_estimator(model, images, labels, num_classes=10):
    """``sample_estimator``: class means and the tied precision (``EmpiricalCovariance``) per layer."""
    import sklearn.covariance
    import torch

    feats = None
    with torch.no_grad():
        for lo in range(0, len(images), BATCH):
            out = [f.view(f.size(0), f.size(1), -1).mean(2) for f in torch_feature_list(model, images[lo:lo + BATCH])]
            feats = out if feats is None else [torch.cat([a, b]) for a, b in zip(feats, out)]
    means, precisions = [], []
    for f in feats:
        f = f.numpy().astype(np.float64)
        mu = np.stack([f[labels == c].mean(0) for c in range(num_classes)])
        gl = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(f - mu[labels])
        means.append(torch.from_numpy(mu).float())
        precisions.append(torch.from_numpy(gl.precision_).float())
    return means, precisions


def torch_mahalanobis_score(model, images, means, precision, layer_index, magnitude, std, num_classes=10):
    """``get_Mahalanobis_score`` for one layer and one ε over batches of 100, as the reference writes it."""
    import torch

    out_scores = []
    std = torch.tensor(std).view(1, 3, 1, 1)
    for lo in range(0, len(images), BATCH):
        data = images[lo:lo + BATCH].clone().requires_grad_(True)
        f = torch_intermediate_forward(model, data, layer_index)
        f = f.view(f.size(0), f.size(1), -1).mean(2)
        gaussian_score = []
        for i in range(num_classes):
            zero_f = f.data - means[layer_index][i]
            gaussian_score.append((-0.5 * torch.mm(torch.mm(zero_f, precision[layer_index]), zero_f.t()).diag())
                                  .view(-1, 1))
        gaussian_score = torch.cat(gaussian_score, 1)
        sample_pred = gaussian_score.max(1)[1]
        batch_sample_mean = means[layer_index].index_select(0, sample_pred)
        zero_f = f - batch_sample_mean
        pure_gau = -0.5 * torch.mm(torch.mm(zero_f, precision[layer_index]), zero_f.t()).diag()
        loss = torch.mean(-pure_gau)
        loss.backward()
        gradient = (torch.ge(data.grad.data, 0).float() - 0.5) * 2
        gradient = gradient / std                                   # the step in normalised units
        temp = data.data - magnitude * gradient
        with torch.no_grad():
            nf = torch_intermediate_forward(model, temp, layer_index)
            nf = nf.view(nf.size(0), nf.size(1), -1).mean(2)
            noise_score = []
            for i in range(num_classes):
                zero_f = nf - means[layer_index][i]
                noise_score.append((-0.5 * torch.mm(torch.mm(zero_f, precision[layer_index]), zero_f.t()).diag())
                                   .view(-1, 1))
            out_scores.append(torch.cat(noise_score, 1).max(1)[0].numpy())
    return np.concatenate(out_scores)


def run_torch(model, images_t, labels, std):
    means, precisions = torch_sample_estimator(model, images_t, labels)
    scores = np.stack([np.stack([torch_mahalanobis_score(model, images_t, means, precisions, li, e, std)
                                 for li in range(4)], 1) for e in EPSILONS], 2)
    return scores


# --------------------------------------------------------------------------- jaxroute
def jax_runner(model):
    """features + Gaussians + scores with jaxroute; the jitted functions are built once (compiled in the warm-up)."""
    import jax

    from jaxroute.detection.features import feature_fn, stage_points
    from jaxroute.detection.mahalanobis import MahalanobisConfig, MahalanobisScorer
    from jaxroute.utils.devices import map_batches

    points = stage_points(model)
    fn = feature_fn(model, points)
    scorer = MahalanobisScorer(model, points, MahalanobisConfig(epsilons=EPSILONS), batch_size=BATCH)

    def run(images, labels):
        feats = map_batches(lambda i, x: fn(x, None, None), (images,), BATCH)
        scorer.fit([feats[f"pool_{p}"] for p in points], labels)
        return jax.block_until_ready(scorer.score(images))

    return run


def timed(fn, repeats, warm_up):
    warm_up()                                                 # compilation / oneDNN primitives
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return ts, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="200 images, one repeat")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 200, 1
    if args.images < BATCH or args.images % BATCH:
        raise SystemExit(f"--images must be a positive multiple of {BATCH}")

    import jax
    import torch

    from benchmarks import torch_dgr as td
    from jaxroute.weights.loader import load_model

    # all cores, or those taskset names (platforms without affinity masks: all cores)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    images, labels, source = cifar_images(args.images)
    ckpt = CHECKPOINTS["resnet20"]
    if ckpt.is_file():
        model, weights = load_model("resnet20", str(ckpt)), f"pretrained {ckpt.name}"
    else:
        model, weights = load_model("resnet20", key=jax.random.key(0)), "random init"
    from benchmarks.torch_dgr import flatten_variables

    tmodel = td.build_model(20, flax_variables=flatten_variables(jax.device_get(model.variables)))
    images_t = td.to_torch_input(images)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, {threads} available to this process), "
          f"{platform.platform()}")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.local_device_count()} device(s)); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.images} images ({source}); ResNet-20 {weights}; 4 layers x {len(EPSILONS)} eps; "
          f"{args.repeats} timed repeat(s)", flush=True)

    run_jax = jax_runner(model)
    tj, sj = timed(lambda: run_jax(images, labels), args.repeats, warm_up=lambda: run_jax(images, labels))
    tt, st = timed(lambda: run_torch(tmodel, images_t, labels, td.IMAGENET_STD), args.repeats,
                   warm_up=lambda: run_torch(tmodel, images_t[:BATCH], labels[:BATCH], td.IMAGENET_STD))
    diff = float(np.max(np.abs(sj - st) / np.maximum(1.0, np.abs(st))))
    res = {"images": args.images, "cpu": cpu_model(), "threads": threads, "jax_s": tj, "torch_s": tt,
           "jax_median_s": median(tj), "torch_median_s": median(tt), "ratio": median(tt) / median(tj),
           "max_rel_score_diff": diff, "weights": weights, "data": source}
    print("| implementation | median s | images/s |\n|---|---|---|")
    print(f"| jaxroute | {res['jax_median_s']:.2f} | {args.images / res['jax_median_s']:.1f} |")
    print(f"| PyTorch reference loop | {res['torch_median_s']:.2f} | {args.images / res['torch_median_s']:.1f} |")
    print(f"speed-up {res['ratio']:.2f}x; scores agree to {diff:.2e} (max relative difference)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
