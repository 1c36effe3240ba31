"""One run of the feature-space detector protocol, cached and resumable (``jaxroute adv-detect``).

:func:`run_detection` does every step of Lee et al.'s protocol
(:mod:`jaxroute.detection.protocol`) for a model, a labelled test set and a
training set:

1. attacks: adversarial twins of every test image for each attack
   (:func:`protocol_configs`: FGSM ε = 0.05, BIM 0.01 × 6 steps without a
   ball, DeepFool ≤ 5 iterations with overshoot 0.02, CW-L2 c = 1, κ = 0,
   Adam 0.01, 100 steps, one round; pixel units) and noisy twins whose
   Gaussian noise matches the attack's mean L2 (:func:`attack_twins`);
2. selection: clean-correct, noisy-correct, adversarial-wrong images;
3. features: pooled stage features, penultimate features and logits of the
   training, clean, adversarial and noisy images (the extraction job); for
   the subnet detector also the training images' pooled features through
   their own class's subnetwork;
4. characteristics per detector and attack (Mahalanobis: layer scores at
   every ε; subnet: the class-subnetwork Mahalanobis layer scores of Wang,
   Hu, Su at every ε, each test image through all K subnetworks; LID:
   layer estimates at every k; KD+PU: density and uncertainty; cdrp: the
   image's DGR routing path, :func:`cdrp_characteristics`);
5. the protocol: known attack (each attack fitted on itself) and unknown
   attack (fitted on FGSM, tested on the others), AUROC.

Cache layout under ``out`` (every file written atomically; a rerun resumes,
and a file computed with other settings is refused rather than mixed in)::

    attacks/<attack>.npz             adversarial and noisy twins, their predictions
    features/<set>/                  extraction shards (train, clean, <attack>-adv, <attack>-noisy;
                                     train-subnet: through each image's own class's subnetwork)
    scores/<detector>-<attack>.npz   characteristics of the selected images, per candidate
    scores/<detector>-clean.npz      Mahalanobis / subnet / KD+PU / CDRP characteristics of every
                                     clean test image, computed once and shared by the attacks
    result.json                      the AUROCs

The clean images' (subnet) Mahalanobis scores, predictive uncertainties and CDRPs do
not depend on the attack, so they are computed once for all test images and each
attack takes its selected rows.  LID is not shared: a query's reference is
the clean mini-batch of the *selected* images it falls in, as in the
reference code.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxroute.utils.checks import check_int

DETECTORS = ("kd_pu", "lid", "mahalanobis", "subnet", "cdrp")
# the classifiers the cdrp detector may use in the protocol (the others use its logistic regression)
CDRP_CLASSIFIERS = ("logistic", "random_forest", "adaboost", "gradient_boosting")
ATTACK_NAMES = ("fgsm", "bim", "deepfool", "cw")
# detectors that read no extracted features (a run of only these extracts none)
FEATURELESS = frozenset({"cdrp"})
# the result keys that repeat a detector's chosen candidates under the name of what is chosen
CHOSEN_AS = {"mahalanobis": "chosen_eps", "lid": "chosen_k"}


def protocol_configs() -> dict:
    """The attacks of Lee et al.'s protocol, in pixel units (see :mod:`jaxroute.detection.protocol`)."""
    from jaxroute.attacks import BIMConfig, CWConfig, DeepFoolConfig, FGSMConfig

    return {
        "fgsm": FGSMConfig(eps=0.05),
        "bim": BIMConfig(eps=0.01, steps=6),                 # one step of 0.01, then five more; no ball
        "deepfool": DeepFoolConfig(max_iter=5, overshoot=0.02),
        "cw": CWConfig(initial_c=1.0, kappa=0.0, lr=0.01, steps=100, binary_search_steps=1),
    }


def check_names(names: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """``names`` as a tuple, or a ValueError naming the unknown ones and the choices."""
    names = tuple(names)
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"unknown {what} {bad or list(names)!r}; choose from {', '.join(allowed)}")
    return names


def _argmax(logits):
    import jax.numpy as jnp

    return jnp.argmax(logits, -1)


def attack_twins(model, test, name: str, config, out: Path, seed: int, batch_size: int, log=print) -> dict:
    """Adversarial and noisy twins of the test images (cached as ``out/attacks/<name>.npz``)."""
    import jax

    from jaxroute.attacks import attack_dataset
    from jaxroute.detection.protocol import noise_sigma, noisy_twins
    from jaxroute.utils.devices import map_batches
    from jaxroute.utils.io import atomic_save_npz

    path = Path(out) / "attacks" / f"{name}.npz"
    if path.exists():
        with np.load(path) as z:
            if len(z["labels"]) == len(test.images):
                return dict(z)
        raise ValueError(f"{path} holds another number of images than the data; use another --out")
    log(f"attack {name} on {len(test.images)} images")
    images = np.asarray(test.images, np.float32)
    labels = np.asarray(test.labels)
    key = jax.random.key(seed)
    arrays = attack_dataset(model.logits, images, labels, attack=name, config=config,
                            key=jax.random.fold_in(key, 0), batch_size=batch_size)
    ok = arrays["success"].astype(bool)
    sigma = noise_sigma(arrays["l2"][ok] if ok.any() else arrays["l2"], images.shape[1:])
    kn = jax.random.fold_in(key, 1)
    bs = min(batch_size, len(images))
    noisy = map_batches(jax.jit(lambda i, x: noisy_twins(x, sigma, jax.random.fold_in(kn, i))), (images,), bs)
    pred = map_batches(jax.jit(lambda i, x: _argmax(model.logits(x))), (noisy,), bs)
    res = {"adv": arrays["images"], "adv_pred": arrays["adv_pred"], "l2": arrays["l2"], "labels": labels,
           "clean_pred": arrays["clean_pred"], "noisy": noisy, "noisy_pred": pred, "sigma": np.float64(sigma)}
    atomic_save_npz(path, **res)
    return res


def extract_features(model, points, images, labels, class_names, out: Path, job: dict, batch_size: int,
                     log=print, class_gates=None) -> dict:
    """Pooled features, penultimate features and logits of ``images`` through the extraction job (resumable);
    with ``class_gates`` (K, D) only the pooled features, each image through its own label's subnetwork."""
    from jaxroute.data import Dataset
    from jaxroute.detection.features import feature_fn
    from jaxroute.extraction import load_shards, plan_batches, run_extraction

    ds = Dataset(np.asarray(images, np.float32), np.asarray(labels, np.int32), tuple(class_names), job["set"])
    plan = plan_batches(len(ds.images), batch_size, 1000)
    fn = feature_fn(model, points, class_gates=class_gates, by_label=class_gates is not None)
    run_extraction(fn, ds, out, job=job, plan=plan, progress=False, desc=job["set"], log=log)
    return load_shards(out)


def cached_scores(out: Path, name: str, setting: Mapping, compute: Callable[[], dict]) -> dict:
    """Characteristics from ``out/scores/<name>.npz``, computed and saved when absent; a file
    computed with other settings is refused rather than mixed in."""
    from jaxroute.utils.io import atomic_save_npz

    path = Path(out) / "scores" / f"{name}.npz"
    tag = json.dumps(dict(setting), sort_keys=True)
    if path.exists():
        with np.load(path) as z:
            if str(z["setting"]) != tag:
                raise ValueError(f"{path} was computed with other settings ({z['setting']} vs {tag}); "
                                 "use another --out")
            return {k: z[k] for k in z.files if k != "setting"}
    res = compute()
    atomic_save_npz(path, setting=np.array(tag), **res)
    return res


def subnet_gates(subnets, model) -> np.ndarray:
    """The class subnetworks as (K, D) gates for ``model``
    (:func:`jaxroute.routing.subnet.class_gates`: a ``jaxroute subnet`` folder or its ``subnets.npz``, a
    :class:`~jaxroute.routing.subnet.Subnets`, or a (K, D) array); None, another model's subnetworks, a
    folder without ``subnets.npz`` or a class without a subnetwork end in one clear error."""
    from jaxroute.routing.subnet import class_gates

    if subnets is None:
        raise ValueError("the subnet detector needs --subnets DIR (class subnetworks)")
    return class_gates(subnets, model)


def gates_id(gates) -> str:
    """A short fingerprint of class gates: what the subnet detector's cached files depend on."""
    from jaxroute.utils.cache import fingerprint

    return fingerprint([gates])


def cdrp_program(model, config=None) -> Callable:
    """Jitted ``fn(batch_index, images) -> (B, D)`` CDRPs: the route job's DGR program
    (:func:`jaxroute.routing.job.route_outputs`), keeping only the flattened per-sample gates (the
    penultimate features it also returns are not computed: XLA drops unused outputs)."""
    import jax

    from jaxroute.routing.job import route_outputs

    route = route_outputs(model, "dgr", config)
    return jax.jit(lambda i, x: route(x)["cdrp"])


def cdrp_characteristics(model, images, config=None, batch_size: int = 100, program: Callable | None = None
                         ) -> np.ndarray:
    """The cdrp detector's characteristic of every image: its DGR routing path (Wang et al., CVPR 2018,
    :func:`jaxroute.routing.dgr.dgr_route` with ``config``, a
    :class:`~jaxroute.routing.dgr.DGRConfig`, the paper's defaults when None), the (N, D) flattened gates.

    Fixed-size batches of ``batch_size`` (the last one padded), so one compiled program serves every
    set; ``program`` (from :func:`cdrp_program`) reuses a compiled one.
    """
    from jaxroute.utils.devices import map_batches

    check_int(batch_size, "batch_size", 1)
    fn = cdrp_program(model, config) if program is None else program
    return np.asarray(map_batches(fn, (np.asarray(images, np.float32),), batch_size))


@dataclasses.dataclass(frozen=True)
class _Sets:
    """What every detector's characteristics are computed from in one :func:`run_detection`: the
    attacks, the clean test images and labels, each attack's twins (``adv``) and selected rows
    (``sel``), the extracted features (``feats``) and the cache folder."""

    attacks: tuple
    labels: np.ndarray
    test_images: np.ndarray
    adv: dict
    sel: dict
    feats: dict
    points: tuple
    out: Path
    log: Callable

    def scores(self, name: str, setting: Mapping, compute: Callable[[], dict]) -> dict:
        """:func:`cached_scores`, logging the time of what is computed."""
        def run():
            t = time.perf_counter()
            res = compute()
            self.log(f"scores {name}: {time.perf_counter() - t:.1f} s")
            return res
        return cached_scores(self.out, name, setting, run)

    def per_attack(self, name: str, setting: Mapping, score: Callable, clean: np.ndarray) -> dict:
        """``{attack: {adv, clean, noisy}}``: ``score(images)`` of each attack's selected adversarial and
        noisy twins, and the selected rows of ``clean`` (the clean test images' characteristics)."""
        return {a: self.scores(f"{name}-{a}", setting, lambda a=a, i=self.sel[a]: {
            "adv": score(self.adv[a]["adv"][i]), "clean": clean[i], "noisy": score(self.adv[a]["noisy"][i])})
            for a in self.attacks}


def _gaussian_characteristics(sets: _Sets, name: str, scorer, train_feats: dict, setting: dict) -> dict:
    """Mahalanobis (or subnet Mahalanobis) layer scores at every ε of ``setting["epsilons"]`` (the
    cached files' setting): ``{attack: {"eps=ε": (adv, clean, noisy)}}``."""
    from jaxroute.detection.features import load_features

    scorer.fit(load_features(train_feats, sets.points), train_feats["label"])
    clean = sets.scores(f"{name}-clean", {**setting, "n": len(sets.labels)},
                        lambda: {"clean": scorer.score(sets.test_images)})["clean"]
    return {a: {f"eps={e:g}": (s["adv"][:, :, k], s["clean"][:, :, k], s["noisy"][:, :, k])
                for k, e in enumerate(setting["epsilons"])}
            for a, s in sets.per_attack(name, setting, scorer.score, clean).items()}


def _lid_characteristics(sets: _Sets, cfg) -> dict:
    """LID layer estimates at every k, each query against the clean mini-batch of the selected images
    it falls in (not shared between attacks): ``{attack: {"k=k": (adv, clean, noisy)}}``."""
    from jaxroute.detection.features import load_features
    from jaxroute.detection.lid import lid_features

    def rows(set_name, i):
        return [f[i] for f in load_features(sets.feats[set_name], sets.points)]

    chars = {}
    for a in sets.attacks:
        i = sets.sel[a]

        def compute(a=a, i=i):
            c, ad, no = lid_features(rows("clean", i), [rows(f"{a}-{k}", i) for k in ("adv", "noisy")], cfg)
            return {"adv": ad, "clean": c, "noisy": no}
        s = sets.scores(f"lid-{a}", {"ks": cfg.ks, "rule": cfg.drop_first, "batch": cfg.batch_size}, compute)
        chars[a] = {f"k={k}": (s["adv"][:, :, j], s["clean"][:, :, j], s["noisy"][:, :, j])
                    for j, k in enumerate(cfg.ks)}
    return chars


def _kd_pu_characteristics(sets: _Sets, model, cfg, batch_size: int, seed: int) -> dict:
    """Kernel density and predictive uncertainty, z-scored: ``{attack: {"-": (adv, clean, noisy)}}``."""
    import jax

    from jaxroute.detection.density import KernelDensity, uncertainty, zscore

    feats = sets.feats
    kd = KernelDensity(cfg.bandwidth).fit(feats["train"]["penultimate"], feats["train"]["label"])
    key = jax.random.key(seed + 1)
    setting = {"bandwidth": cfg.bandwidth, "passes": cfg.passes, "keep": cfg.keep}

    def kd_pu_of(f, imgs, k):
        dens = kd.score(f["penultimate"], np.argmax(f["logits"], -1))
        unc = uncertainty(model, imgs, jax.random.fold_in(key, k), cfg, batch_size)
        return np.stack([dens, unc], 1)

    # stream 1: the clean images (the adversarial and noisy twins of attack j use 2j + 2, 2j + 3)
    clean = sets.scores("kd_pu-clean", {**setting, "n": len(sets.labels)},
                        lambda: {"clean": kd_pu_of(feats["clean"], sets.test_images, 1)})["clean"]
    chars = {}
    for a in sets.attacks:
        i, j = sets.sel[a], ATTACK_NAMES.index(a)

        def compute(a=a, i=i, j=j):
            rows = {k: {n: v[i] for n, v in feats[f"{a}-{k}"].items() if n in ("penultimate", "logits")}
                    for k in ("adv", "noisy")}
            return {"adv": kd_pu_of(rows["adv"], sets.adv[a]["adv"][i], 2 * j + 2), "clean": clean[i],
                    "noisy": kd_pu_of(rows["noisy"], sets.adv[a]["noisy"][i], 2 * j + 3)}
        s = sets.scores(f"kd_pu-{a}", setting, compute)
        chars[a] = {"-": tuple(zscore(s["adv"], s["clean"], s["noisy"]))}
    return chars


def _cdrp_characteristics(sets: _Sets, model, cfg, batch_size: int) -> dict:
    """DGR routing paths (one compiled program for every set): ``{attack: {"-": (adv, clean, noisy)}}``."""
    setting = {"dgr": dataclasses.asdict(cfg)}
    program = cdrp_program(model, cfg)

    def cdrps(images):
        return cdrp_characteristics(model, images, cfg, batch_size, program)

    clean = sets.scores("cdrp-clean", {**setting, "n": len(sets.labels)},
                        lambda: {"clean": cdrps(sets.test_images)})["clean"]
    return {a: {"-": (s["adv"], s["clean"], s["noisy"])}
            for a, s in sets.per_attack("cdrp", setting, cdrps, clean).items()}


def run_detection(model, test, train, *, out, attacks: Sequence[str] = ATTACK_NAMES,
                  detectors: Sequence[str] = ("kd_pu", "lid", "mahalanobis"), mahalanobis=None, lid=None,
                  kd_pu=None, subnets=None, dgr=None, cdrp_classifier: str = "logistic", runs: int = 1,
                  batch_size: int = 100, seed: int = 0,
                  job: Mapping | None = None, train_job: Mapping | None = None, test_job: Mapping | None = None,
                  log: Callable[[str], object] = print) -> dict:
    """The feature-space detector protocol (see the module doc) for ``model`` on ``test``, class
    statistics from ``train``; everything cached under ``out``.

    ``mahalanobis`` / ``lid`` / ``kd_pu``: the detectors' configs
    (:class:`~jaxroute.detection.mahalanobis.MahalanobisConfig`,
    :class:`~jaxroute.detection.lid.LIDConfig`,
    :class:`~jaxroute.detection.density.KDPUConfig`; their defaults when
    None).  ``job`` describes what the features depend on besides the model
    and the images (weights, data), ``train_job`` / ``test_job`` the two sets
    (split, limit); they are recorded in, and checked against, the feature
    manifests.  ``subnets``: the class subnetworks of the ``subnet``
    detector (:func:`subnet_gates`: a ``jaxroute subnet`` folder, a
    :class:`~jaxroute.routing.subnet.Subnets` or a (K, D) array; needed
    when ``subnet`` is among ``detectors``); it uses the ``mahalanobis``
    config (the same ε grid and shrinkage; see
    :class:`~jaxroute.detection.mahalanobis.SubnetMahalanobisScorer`).

    ``cdrp``: the DGR paper's routing paths as characteristics
    (:func:`cdrp_characteristics`; ``dgr`` the
    :class:`~jaxroute.routing.dgr.DGRConfig`; when None its defaults: the
    paper's T = 30, lr 0.1, momentum 0.9, clip [0, 10], and γ = 0.05), one candidate ``"-"``
    per attack; it needs no extracted features.  The DGR paper's detector
    trains a random forest, AdaBoost or gradient boosting on the CDRPs of
    real and adversarial images (:mod:`jaxroute.detection.detector`,
    ``reports/cdrp``); here the CDRPs go through this protocol like every
    other detector (the same selection, noisy twins, split and, by default,
    the same logistic regression), so every row of Table 2 shares split and
    classifier.  ``cdrp_classifier`` (one of :data:`CDRP_CLASSIFIERS`)
    replaces that regression for this detector only by one of the DGR
    paper's classifiers (:class:`~jaxroute.detection.detector.TreeDetector`,
    fitted on the same rows).  A GPU/TPU routes far faster than a CPU: DGR
    runs T forward/backward passes per image, over all test images and the
    selected adversarial and noisy twins of every attack.

    Returns ``{detector: {attack: auroc}}``, ``<detector>_std``, ``unknown``
    (``{detector: {attack: auroc}}``, fitted on FGSM), ``n_selected``,
    ``chosen`` (``{detector: {attack: [candidate per run]}}``, every
    detector), ``chosen_eps`` (Mahalanobis) and ``chosen_k`` (LID) (per
    attack, one entry per run), ``runs``, ``lid_rule`` and ``points`` (with
    ``cdrp`` also ``cdrp_classifier`` and ``dgr``, the config); also
    written to ``out/result.json``.
    """
    from jaxroute.data import Dataset
    from jaxroute.detection.density import KDPUConfig
    from jaxroute.detection.features import stage_points
    from jaxroute.detection.lid import LIDConfig
    from jaxroute.detection.mahalanobis import MahalanobisConfig, MahalanobisScorer, SubnetMahalanobisScorer
    from jaxroute.detection.protocol import MIN_SELECTED, LogisticDetector, run_protocol, select
    from jaxroute.routing.dgr import DGRConfig
    from jaxroute.utils.io import check_writable_dir

    attacks = check_names(attacks, ATTACK_NAMES, "attack(s)")
    detectors = check_names(detectors, DETECTORS, "detector(s)")
    check_int(runs, "runs", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed", 0)
    for name, cfg, cls in (("mahalanobis", mahalanobis, MahalanobisConfig), ("lid", lid, LIDConfig),
                           ("kd_pu", kd_pu, KDPUConfig), ("dgr", dgr, DGRConfig)):
        if cfg is not None and not isinstance(cfg, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(cfg).__name__}")
    mcfg = (mahalanobis or MahalanobisConfig()) if {"mahalanobis", "subnet"} & set(detectors) else None
    lcfg = (lid or LIDConfig()) if "lid" in detectors else None
    kcfg = (kd_pu or KDPUConfig()) if "kd_pu" in detectors else None
    dcfg = (dgr or DGRConfig()) if "cdrp" in detectors else None
    check_names((cdrp_classifier,), CDRP_CLASSIFIERS, "cdrp classifier")
    if test.labels is None:
        raise ValueError(f"data {test.name!r} has no labels; the protocol needs the true labels")
    if train.labels is None:
        raise ValueError(f"data {train.name!r} has no labels; the class statistics need the true labels")
    gates = subnet_gates(subnets, model) if "subnet" in detectors else None
    out = check_writable_dir(out)

    points = stage_points(model)
    base = {"model": model.name, **dict(job or {}), "points": list(points)}
    names = test.class_names
    test_images = np.asarray(test.images, np.float32)
    labels = np.asarray(test.labels)

    def features(name, images, set_labels, set_job, class_gates=None):
        t = time.perf_counter()
        res = extract_features(model, points, images, set_labels, names, out / "features" / name,
                               {**base, "set": name, **dict(set_job or {})}, batch_size, log, class_gates)
        log(f"features {name}: {len(set_labels)} images, {time.perf_counter() - t:.1f} s")
        return res

    with_features = bool(set(detectors) - FEATURELESS)
    feats = {}
    if with_features:
        feats["train"] = features("train", train.images, train.labels, train_job)
    if gates is not None:
        feats["train-subnet"] = features("train-subnet", train.images, train.labels,
                                         {**dict(train_job or {}), "subnets": gates_id(gates)}, gates)
    if with_features:
        feats["clean"] = features("clean", test_images, labels, test_job)
    cfg = protocol_configs()
    adv, sel = {}, {}
    for a in attacks:
        t = time.perf_counter()
        adv[a] = attack_twins(model, Dataset(test_images, labels, tuple(names), test.name), a, cfg[a], out, seed,
                              batch_size, log)
        log(f"attack {a}: {time.perf_counter() - t:.1f} s")
        for kind in ("adv", "noisy") if with_features else ():
            feats[f"{a}-{kind}"] = features(f"{a}-{kind}", adv[a][kind], labels, test_job)
        sel[a] = np.flatnonzero(select(labels, adv[a]["clean_pred"], adv[a]["noisy_pred"], adv[a]["adv_pred"]))
        if len(sel[a]) < MIN_SELECTED:
            raise ValueError(f"attack {a}: only {len(sel[a])} images are clean-correct, noisy-correct and "
                             f"adversarial-wrong; the protocol needs at least {MIN_SELECTED} (use more images)")
        log(f"{a}: {len(sel[a])} of {len(labels)} images selected")

    sets = _Sets(attacks, labels, test_images, adv, sel, feats, points, out, log)
    gaussian = {"epsilons": mcfg.epsilons, "shrinkage": mcfg.shrinkage} if mcfg else None
    characteristics = {
        "mahalanobis": lambda: _gaussian_characteristics(
            sets, "mahalanobis", MahalanobisScorer(model, points, mcfg, batch_size=batch_size), feats["train"],
            gaussian),
        "subnet": lambda: _gaussian_characteristics(
            sets, "subnet", SubnetMahalanobisScorer(model, points, gates, mcfg, batch_size=batch_size),
            feats["train-subnet"], {**gaussian, "subnets": gates_id(gates)}),
        "lid": lambda: _lid_characteristics(sets, lcfg),
        "kd_pu": lambda: _kd_pu_characteristics(sets, model, kcfg, batch_size, seed),
        "cdrp": lambda: _cdrp_characteristics(sets, model, dcfg, batch_size),
    }
    chars = {d: compute() for d, compute in characteristics.items() if d in detectors}

    result = {"n_selected": {a: int(len(sel[a])) for a in attacks}, "unknown": {}, "chosen": {},
              **{key: {} for key in CHOSEN_AS.values()},
              "runs": runs, "lid_rule": (lid or LIDConfig()).drop_first, "points": list(points)}
    if "cdrp" in detectors:
        result["cdrp_classifier"], result["dgr"] = cdrp_classifier, dataclasses.asdict(dcfg)
    for d in detectors:
        classifier = LogisticDetector
        if d == "cdrp" and cdrp_classifier != "logistic":
            from jaxroute.detection.detector import TreeDetector

            classifier = lambda seed, c=cdrp_classifier: TreeDetector(c, seed=seed)   # noqa: E731
        res = run_protocol(chars[d], runs=runs, seed=seed, known="fgsm", detector=classifier)
        result[d] = {a: v["mean"] for a, v in res["known"].items()}
        result[f"{d}_std"] = {a: v["std"] for a, v in res["known"].items()}
        result["unknown"][d] = {a: v["mean"] for a, v in res["unknown"].items()}
        result["chosen"][d] = {a: v["chosen"] for a, v in res["known"].items()}
        if d in CHOSEN_AS:
            result[CHOSEN_AS[d]] = result["chosen"][d]
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def format_table(result: Mapping, attacks: Sequence[str], detectors: Sequence[str]) -> str:
    """The AUROCs (%) as a plain-text table, a ``from fgsm`` row under each detector with unknown-attack AUROCs."""
    lines = [f"{'detector':12s} " + " ".join(f"{a:>9s}" for a in attacks)]
    for d in detectors:
        lines.append(f"{d:12s} " + " ".join(f"{100 * result[d][a]:9.2f}" for a in attacks))
        if result["unknown"].get(d):
            lines.append(f"{'  from fgsm':12s} " + " ".join(
                f"{100 * result['unknown'][d][a]:9.2f}" if a in result["unknown"][d] else f"{'':9s}" for a in attacks))
    return "AUROC %\n" + "\n".join(lines)


def attack_summary(out, attacks: Sequence[str]) -> dict:
    """Per cached attack: images, success rate and median / mean L2 of the successful adversarials among
    the clean-correct images, the noise σ of the twins and how many noisy twins stay correct."""
    res = {}
    for a in attacks:
        path = Path(out) / "attacks" / f"{a}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run the detection job first")
        with np.load(path) as z:
            y, clean, advp, l2, noisy = z["labels"], z["clean_pred"], z["adv_pred"], z["l2"], z["noisy_pred"]
            sigma = float(z["sigma"])
        ok = clean == y
        won = ok & (advp != y)
        res[a] = {"n": int(len(y)), "clean_correct": int(ok.sum()),
                  "success_rate": float(won.sum() / max(ok.sum(), 1)),
                  "median_l2": float(np.median(l2[won])) if won.any() else None,
                  "mean_l2": float(np.mean(l2[won])) if won.any() else None,
                  "noise_sigma": sigma, "noisy_correct": float(np.mean(noisy[ok] == y[ok])) if ok.any() else None}
    return res


__all__ = ["ATTACK_NAMES", "CDRP_CLASSIFIERS", "DETECTORS", "attack_summary", "attack_twins", "cached_scores",
           "cdrp_characteristics", "cdrp_program", "check_names", "extract_features", "format_table", "gates_id",
           "protocol_configs", "run_detection", "subnet_gates"]
