"""Adversarial examples as an interpretability probe (Dong et al., arXiv:1708.05493) on CIFAR-10.

    python -m experiments.dong_probe --out reports/dong [--limit 2000]

With the pretrained CIFAR-10 ResNet-20 and ResNet-32 of ``../shared`` (the
ensemble, in place of the paper's AlexNet + VGG-16 + ResNet-18), one command
writes into ``OUT``:

* the adversarial set (§2.1): the ensemble attack towards the k = 9 least
  likely classes of each test image (every other class on CIFAR-10), with its
  success rate and median L2;
* per model: neuron consistency LC / CS1 / CS2 over every gate point (Fig. 4;
  ``fig4_<model>.png`` bins CS by LC), σ = 1 and σ = 3 rows; r1 / r2 at
  ``layer3.2`` and at the pooled 64-d features with the real-image control
  (Fig. 5); the class-conditional Gaussian detector's AUC (Fig. 6);
* ResNet-20-Adv, fine-tuned with the feature-consistency loss (Eq. 8), probed
  again (Fig. 8, 9) and scored (Appendix Tables 1-2): top-1/top-5 on clean
  images, on the saved adversarial set (transfer, as the paper) and on a
  white-box set regenerated against it, and under FGS with the true label at
  ε = 1/255 and 5/255;
* PD tracing at ``layer3.2`` (Fig. 10): the most frequent top-2 neurons of the
  first 500 test images (``jaxroute trace`` draws their top real images);
* ``README.md`` (tables, comparison with the paper) and ``dong.json``.

Cache and resume: the adversarial sets, fine-tuning state (per epoch) and each
model's probe results live under ``OUT/cache`` (written atomically); a run
started again with the same arguments reuses them, another set of arguments is
refused.  ``--limit N`` uses the first N test images (class-interleaved); the
report states which run it is.

Choices (the paper is silent; stated in the report): a channel's response is
its spatial maximum; Fig. 4's bins are 10 equal-width LC bins; ε = 1/255 per
attack step, y* = least likely class of the current model, SGD momentum 0.9,
weight decay 5e-5, batch 100, lr 0.01 cosine, BN frozen for the fine-tuning.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import configure_and_run

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}
PAPER = {  # Dong et al. figures quoted in the report (AlexNet / VGG-16 / ResNet-18)
    "r1": "1.07 / 1.26 / 1.34", "r2": "0.80 / 0.73 / 0.76", "auc": "0.817 / 0.847 / 0.926",
    "r1_adv": "0.98 / 0.99 / 0.98", "r2_adv": "0.90 / 0.92 / 0.87",
}


@dataclasses.dataclass(frozen=True)
class Config:
    models_dir: str = str(SHARED / "models/cifar10-resnet")
    data: str = str(SHARED / "data/cifar10-jpeg")
    wordnet: str = str(SHARED / "data/wordnet")
    limit: int | None = None          # test images (None: all 10,000)
    train_limit: int | None = 10000   # train images for the Gaussian detector and the fine-tuning
    k: int = 9                        # targets per image
    attack_steps: int = 20
    attack_lr: float = 5 / 255        # Adam step of the ensemble attack (paper: 5 on [0, 255])
    epochs: int = 5
    top_frac: float = 0.01
    point: str = "layer3.2"
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self):
        for f in ("k", "attack_steps", "epochs", "batch_size"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if not np.isfinite(self.attack_lr) or self.attack_lr <= 0:
            raise ValueError(f"attack_lr must be a finite step > 0, got {self.attack_lr}")
        for f in ("limit", "train_limit"):
            v = getattr(self, f)
            if v is not None and v < 2:
                raise ValueError(f"{f} must be >= 2, got {v}")


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run(cfg: Config, out: Path, log=print) -> dict:
    from jaxroute.analysis.neurons import binned_curve, consistency_scores
    from jaxroute.analysis.probe import probe
    from jaxroute.analysis.wordnet import correlation_matrix, wordnet_distances
    from jaxroute.attacks import BIMConfig, EnsembleConfig, FGSMConfig, attack_dataset
    from jaxroute.data import Dataset, load_dataset, save_arrays_split
    from jaxroute.training import eval_logits, topk_accuracy
    from jaxroute.training.adversarial import AdvTrainConfig, adversarial_fit
    from jaxroute.utils.cache import cached_json, check_cache_config
    from jaxroute.utils.io import atomic_write_json, atomic_write_text
    from jaxroute.weights import load_model

    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    check_cache_config(cache, dataclasses.asdict(cfg))
    models = {n: load_model(n, Path(cfg.models_dir) / f) for n, f in MODELS.items()}
    test = load_dataset(cfg.data, "test", limit=cfg.limit)
    train = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    test = Dataset(np.asarray(test.images), test.labels, test.class_names, test.name)
    names = tuple(test.class_names)
    dist, _, _ = wordnet_distances(cfg.wordnet, names)
    corr = {s: correlation_matrix(dist, s) for s in (1.0, 3.0)}
    res: dict = {"config": dataclasses.asdict(cfg), "n_test": int(len(test.labels)),
                 "run": "full test set" if cfg.limit is None else f"quick run (--limit {cfg.limit})"}

    def cached(name, make):
        path = cache / f"{name}.npz"
        if not path.exists():
            t = time.perf_counter()
            a = make()
            save_arrays_split(cache, name, a.pop("images"), a.pop("labels"), names, **a)
            log(f"{name}: {time.perf_counter() - t:.0f} s")
        return _load(path)

    # §2.1: the ensemble adversarial set
    fns = tuple(m.logits for m in models.values())
    adv = cached("adv_test", lambda: attack_dataset(
        fns, test.images, test.labels, attack="ensemble", batch_size=cfg.batch_size,
        config=EnsembleConfig(k=cfg.k, steps=cfg.attack_steps, lr=cfg.attack_lr)))
    res["attack"] = {"n": int(len(adv["labels"])), "success_rate": float(adv["success"].mean()),
                     "median_l2": float(np.median(adv["l2"])), "median_l2_255": float(np.median(adv["l2"]) * 255)}

    def probe_model(tag, model):
        def compute() -> dict:
            rows = {}
            for pt in (cfg.point, "pooled"):
                p = None if pt == "pooled" else pt
                if p is None:  # the pooled features: the last gate point reduced by mean = GAP
                    s, arr = _probe_pooled(model, test, adv, corr[1.0], train, cfg)
                else:
                    s, arr = probe(model, test, adv, corr[1.0], train=train, point=p, top_frac=cfg.top_frac,
                                   batch_size=cfg.batch_size)
                rows[pt] = s
                if p is not None:
                    lc3, c13, c23 = (np.asarray(a) for a in consistency_scores(arr["p"], arr["q"], arr["qt"],
                                                                              corr[3.0].astype(np.float32)))
                    rows["sigma3"] = {"lc_mean": float(lc3.mean()), "cs1_mean": float(c13.mean()),
                                      "cs2_mean": float(c23.mean())}
                    curves = {}
                    for name in ("cs1", "cs2"):
                        edges, means, counts = binned_curve(arr["lc"], arr[name], bins=10)
                        curves[name] = [None if np.isnan(v) else float(v) for v in np.asarray(means)]
                    curves["edges"] = [float(e) for e in np.asarray(edges)]
                    curves["counts"] = [int(c) for c in np.asarray(counts)]
                    rows["fig4"] = curves
                    _plot_fig4(curves, out / f"fig4_{tag}.png", tag)
            return rows

        return cached_json(cache / f"probe_{tag}.json", compute)

    res["probe"] = {n: probe_model(n, m) for n, m in models.items()}

    # Eq. 8: ResNet-20-Adv
    base = models["resnet20"]
    acfg = AdvTrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed)
    t = time.perf_counter()
    fit = adversarial_fit(base, train, acfg, cache / "advtrain_resnet20", log=log)
    res["adv_train"] = {"epochs": fit["epochs"], "seconds_this_run": time.perf_counter() - t}
    adv_model = base.with_variables(fit["variables"])
    res["probe"]["resnet20_adv"] = probe_model("resnet20_adv", adv_model)

    # Appendix Tables 1-2
    table = {}
    wb = cached("whitebox_resnet20_adv", lambda: attack_dataset(
        adv_model.logits, test.images, test.labels, attack="bim", targets="least_likely",
        batch_size=cfg.batch_size, config=BIMConfig(eps=1 / 255, steps=10)))
    for tag, model in (("resnet20", base), ("resnet20_adv", adv_model)):
        row = {}
        for name, ds in (("clean", test), ("adv_transfer", adv)):
            images = ds.images if name == "clean" else ds["images"]
            labels = ds.labels if name == "clean" else ds["labels"]
            row[name] = topk_accuracy(eval_logits(model, Dataset(np.asarray(images, np.float32), labels, names,
                                                                 name)), labels)
        for eps in (1, 5):
            f = cached(f"fgs{eps}_{tag}", lambda eps=eps, model=model: attack_dataset(
                model.logits, test.images, test.labels, attack="fgsm", batch_size=cfg.batch_size,
                config=FGSMConfig(eps=eps / 255)))
            row[f"fgs_{eps}"] = topk_accuracy(eval_logits(model, Dataset(f["images"], f["labels"], names, "fgs")),
                                              f["labels"])
        row["whitebox_resnet20_adv"] = topk_accuracy(
            eval_logits(model, Dataset(wb["images"], wb["labels"], names, "wb")), wb["labels"])
        table[tag] = row
    res["table"] = table

    # Eq. 12 / Fig. 10: the neurons the predictions rest on
    from jaxroute.analysis.tracing import trace_dataset

    res["trace"] = {}
    n = min(500, len(test.labels))
    for tag, model in (("resnet20", base), ("resnet20_adv", adv_model)):
        tr = trace_dataset(model, test.images[:n], cfg.point, corr[1.0], top=2, batch_size=cfg.batch_size)
        counts = np.bincount(tr["top"].ravel(), minlength=tr["pd"].shape[1])
        order = np.argsort(-counts, kind="stable")[:8]
        res["trace"][tag] = {"n": n, "pd_mean": float(tr["pd"].mean()),
                             "top_neuron_counts": {str(int(i)): int(counts[i]) for i in order}}

    # Fig. 2 / 7 / 10: what the neurons' top real and top adversarial images look like
    figs = {"resnet20": ("fig2", models["resnet20"]), "resnet32": ("fig2", models["resnet32"]),
            "resnet20_adv": ("fig7", adv_model)}
    res["grids"] = {}
    for tag, (fig, model) in figs.items():
        traced = [int(i) for i in res["trace"].get(tag, {}).get("top_neuron_counts", {})][:4]
        res["grids"][tag] = _neuron_grids(model, tag, test, adv, corr[1.0], cfg, out, fig, traced)
    atomic_write_json(out / "dong.json", res)
    atomic_write_text(out / "README.md", report(res))
    log(f"wrote {out / 'README.md'}")
    return res


def _neuron_grids(model, tag, test, adv, corr, cfg, out: Path, fig: str, traced: list[int], rows: int = 8,
                  per_side: int = 6) -> dict:
    """Top real / top adversarial images of the ``rows`` most label-consistent neurons at ``cfg.point``.

    Fig. 2 (7 after adversarial training) of the paper shows hand-picked neurons;
    here the choice is mechanical: the ``rows`` channels with the highest LC
    (ties by channel index).  ``traced`` channels (the most frequent top-PD
    neurons) get their own figure, ``fig10_<tag>.png``.
    """
    from jaxroute.analysis.neurons import neuron_scores
    from jaxroute.analysis.plots import plot_neuron_tops
    from jaxroute.analysis.probe import responses

    names = list(test.class_names)
    off = model.spec.offsets[model.spec.names.index(cfg.point)]
    c = dict(model.spec)[cfg.point]
    real = responses(model, test.images, point=cfg.point, batch_size=cfg.batch_size)["stats"][:, off:off + c]
    fake = responses(model, adv["images"], point=cfg.point, batch_size=cfg.batch_size)["stats"][:, off:off + c]
    ns = neuron_scores(real, test.labels, fake, adv["labels"], adv["target"], corr.astype(np.float32),
                       top_frac=cfg.top_frac)
    lc, cs1, cs2 = (np.asarray(a) for a in (ns.lc, ns.cs1, ns.cs2))
    written = {}
    for name, chosen in ((fig, np.argsort(-lc, kind="stable")[:rows]), ("fig10", np.asarray(traced, int))):
        if len(chosen) == 0:
            continue
        rt = np.argsort(-real[:, chosen], axis=0, kind="stable")[:per_side].T
        at = np.argsort(-fake[:, chosen], axis=0, kind="stable")[:per_side].T
        caps = [[f"{names[adv['labels'][j]][:5]}→{names[adv['target'][j]][:5]}" for j in row] for row in at]
        labels = [f"ch {i}  LC {lc[i]:.2f}\nCS1 {cs1[i]:.2f} CS2 {cs2[i]:.2f}" for i in chosen]
        path = out / f"{name}_{tag}.png"
        what = "most frequent top-2 PD neurons" if name == "fig10" else f"{rows} highest-LC neurons"
        plot_neuron_tops(np.asarray(test.images), rt, adv["images"], at, path, row_labels=labels,
                         adv_captions=caps, title=f"{tag} {cfg.point}: {what}")
        written[name] = {"file": path.name, "channels": [int(i) for i in chosen]}
    return written


def _probe_pooled(model, test, adv, corr, train, cfg):
    """r1/r2 and Gaussian detection on the 64-d pooled features (GAP of the last gate point)."""
    from jaxroute.analysis.probe import gaussian_auc, responses
    from jaxroute.analysis.representation import class_pair_means, control_ratios, distance_ratios

    k = model.num_classes
    pt = model.spec.names[-1]
    r = {n: responses(model, x, point=pt, reduce="mean", batch_size=cfg.batch_size)
         for n, x in (("real", test.images), ("adv", adv["images"]), ("train", train.images))}
    c = dict(model.spec)[pt]
    gap = {n: v["stats"][:, -c:] for n, v in r.items()}  # channel means of the last gate point = the GAP features
    y = np.asarray(test.labels)
    pm = class_pair_means(gap["real"], y, k)
    r1, r2 = distance_ratios(gap["adv"], adv["labels"], adv["target"], gap["real"], y, k, pair_means=pm)
    c1, c2 = control_ratios(gap["real"], y, k)
    auc = gaussian_auc(gap["train"], train.labels, gap["real"], r["real"]["logits"].argmax(-1), gap["adv"],
                       r["adv"]["logits"].argmax(-1), k)
    return {"r1_mean": float(np.nanmean(r1)), "r2_mean": float(np.nanmean(r2)),
            "r1_control_mean": float(np.nanmean(c1)), "r2_control_mean": float(np.nanmean(c2)),
            "gaussian_auc": auc}, {}


def _plot_fig4(curves, path, title):
    from matplotlib.figure import Figure

    e = np.asarray(curves["edges"])
    mid = (e[:-1] + e[1:]) / 2
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    for name in ("cs1", "cs2"):
        ax.plot(mid, [np.nan if v is None else v for v in curves[name]], "o-", label=name.upper())
    ax.set_xlabel("LC (bin centre)")
    ax.set_ylabel("mean CS")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _signed(v) -> str:
    return "n/a" if v is None or v != v else f"{v:+.3f}"


def _shape_lines(res: dict) -> list[str]:
    """The paper's qualitative claims, each checked on this run's numbers."""
    pt = res["config"]["point"]
    yes = lambda ok: "yes" if ok else "**no**"
    out = []
    for tag, p in res["probe"].items():
        s = p[pt]
        r1, r2, c1, c2 = s["r1_mean"], s["r2_mean"], s["spearman_lc_cs1"], s["spearman_lc_cs2"]
        if tag.endswith("_adv"):
            base = res["probe"][tag[:-len("_adv")]][pt]
            out.append(f"- {tag}: r1 closer to 1 than before ({r1:.3f} vs {base['r1_mean']:.3f}): "
                       f"{yes(abs(r1 - 1) < abs(base['r1_mean'] - 1))}; r2 closer to 1 ({r2:.3f} vs "
                       f"{base['r2_mean']:.3f}): {yes(abs(r2 - 1) < abs(base['r2_mean'] - 1))}; CS1 higher than "
                       f"before ({s['cs1_mean']:.3f} vs {base['cs1_mean']:.3f}): {yes(s['cs1_mean'] > base['cs1_mean'])}")
        else:
            out.append(f"- {tag}: r1 > 1 ({r1:.3f}): {yes(r1 > 1)}; r2 < 1 ({r2:.3f}): {yes(r2 < 1)}; "
                       f"CS1 falls with LC (ρ {_signed(c1)}): {yes(c1 is not None and c1 < 0)}; "
                       f"CS2 rises with LC (ρ {_signed(c2)}): {yes(c2 is not None and c2 > 0)}")
    t = res.get("table", {})
    if "resnet20" in t and "resnet20_adv" in t:
        a, b = t["resnet20"], t["resnet20_adv"]
        for key, what in (("adv_transfer", "the saved adversarial set"), ("fgs_1", "FGS ε=1/255"),
                          ("fgs_5", "FGS ε=5/255")):
            out.append(f"- resnet20_adv beats resnet20 on {what} (top-1 {b[key]['top1']:.4f} vs "
                       f"{a[key]['top1']:.4f}): {yes(b[key]['top1'] > a[key]['top1'])}")
        out.append(f"- clean top-1 change from fine-tuning: {b['clean']['top1'] - a['clean']['top1']:+.4f} "
                   "(paper: -0.0214)")
    return out


def report(res: dict) -> str:
    a = res["attack"]
    lines = [
        "# Adversarial examples as an interpretability probe (Dong et al., arXiv:1708.05493) on CIFAR-10", "",
        f"Run: **{res['run']}**, {res['n_test']} test images, {a['n']} adversarial images "
        f"(ensemble of ResNet-20 + ResNet-32, k = {res['config']['k']} least-likely targets). Regenerate with "
        "`python -m experiments.dong_probe --out reports/dong"
        + (f" --limit {res['config']['limit']}" if res["config"]["limit"] else "") + "`.", "",
        f"Ensemble attack ({res['config']['attack_steps']} Adam steps of "
        f"{res['config']['attack_lr'] * 255:.3g}/255): success {a['success_rate']:.4f}, "
        f"median L2 {a['median_l2']:.4f} "
        f"({a['median_l2_255']:.2f} on [0, 255] pixels); the paper gives neither.", "",
        "## Neurons (Fig. 4, 8), ratios (Fig. 5, 9), detection (Fig. 6)", "",
        "| model | LC | CS1 | CS2 | ρ(LC,CS1) | ρ(LC,CS2) | LC σ=3 | CS1 σ=3 | CS2 σ=3 | r1 | r2 | r1 ctrl | r2 ctrl "
        "| AUC | r1 pooled | r2 pooled | AUC pooled |",
        "|---|" + "---:|" * 16,
    ]
    for tag, p in res["probe"].items():
        s, s3, g = p[res["config"]["point"]], p["sigma3"], p["pooled"]
        auc = "n/a" if s["gaussian_auc"] is None else f"{s['gaussian_auc']:.3f}"
        lines.append(f"| {tag} | {s['lc_mean']:.3f} | {s['cs1_mean']:.3f} | {s['cs2_mean']:.3f} | "
                     f"{_signed(s['spearman_lc_cs1'])} | {_signed(s['spearman_lc_cs2'])} | {s3['lc_mean']:.3f} | "
                     f"{s3['cs1_mean']:.3f} | {s3['cs2_mean']:.3f} | {s['r1_mean']:.3f} | {s['r2_mean']:.3f} | "
                     f"{s['r1_control_mean']:.5f} | {s['r2_control_mean']:.5f} | {auc} | {g['r1_mean']:.3f} | "
                     f"{g['r2_mean']:.3f} | {g['gaussian_auc']:.3f} |")
    lines += ["", f"Paper (AlexNet / VGG-16 / ResNet-18): r1 {PAPER['r1']}, r2 {PAPER['r2']}, AUC {PAPER['auc']}; "
              f"after adversarial training r1 {PAPER['r1_adv']}, r2 {PAPER['r2_adv']}.", "",
              "Shape against the paper (measured here, at layer3.2):", ""] + _shape_lines(res) + ["",
              "## Adversarial training (Appendix Tables 1-2), top-1 / top-5", "",
              "| model | clean | adversarial set (transfer) | FGS ε=1/255 | FGS ε=5/255 | white-box vs -Adv |",
              "|---|---:|---:|---:|---:|---:|"]
    for tag, row in res["table"].items():
        cell = lambda r: f"{r['top1']:.4f} / {r['top5']:.4f}"
        lines.append(f"| {tag} | {cell(row['clean'])} | {cell(row['adv_transfer'])} | {cell(row['fgs_1'])} | "
                     f"{cell(row['fgs_5'])} | {cell(row['whitebox_resnet20_adv'])} |")
    lines += ["", "Paper (ResNet-18): clean 66.38/87.13 -> 64.24/85.75; adversarial set 0.02/20.35 -> 46.42/71.48.",
              "", "## PD tracing at layer3.2 (Eq. 12, Fig. 10): the most frequent top-2 neurons", ""]
    for tag, t in res.get("trace", {}).items():
        lines.append(f"- {tag} ({t['n']} test images, mean PD {t['pd_mean']:.3g}): "
                     + ", ".join(f"channel {i} ({c})" for i, c in t["top_neuron_counts"].items()))
    if res.get("grids"):
        lines += ["", "## Top real vs top adversarial images (Fig. 2, 7, 10)", "",
                  "Each row: a layer3.2 channel's 6 top real test images, then its 6 top adversarial images "
                  "(caption: original → target class). Rows of fig2/fig7: the 8 channels of highest LC; "
                  "rows of fig10: the most frequent top-2 PD neurons.", ""]
        for tag, g in res["grids"].items():
            lines += [f"- {tag}: " + ", ".join(f"[{v['file']}]({v['file']}) (channels {v['channels']})"
                                              for v in g.values())]
    lines += ["", "## CIFAR-10 substitutes and choices", "",
              "- Ensemble = the shared ResNet-20 + ResNet-32; 10 classes give k = 9 targets per image.",
              "- WordNet distances as shipped (cat-dog = 2 through 'domestic animal'); σ = 1 (paper) and σ = 3.",
              "- φ = layer3.2 (8×8×64) and the 64-d pooled features; a channel's response is its spatial max.",
              "- Fine-tuning: ε = 1/255 per step, T = 10, y* = least likely class of the current model, SGD "
              "momentum 0.9 (Nesterov), wd 5e-5, batch 100, lr 0.01 cosine, gradient clipped to global norm 1, "
              "BN statistics frozen.",
              "- ρ(LC, CS) is n/a where every LC is equal: with few test images each top set is one image.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/dong")
    p.add_argument("--limit", type=int, default=None, help="first N test images (quick run: 2000)")
    p.add_argument("--train-limit", type=int, default=Config.train_limit)
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--attack-steps", type=int, default=Config.attack_steps)
    p.add_argument("--attack-lr", type=float, default=Config.attack_lr,
                   help="Adam step of the ensemble attack in [0, 1] pixels (default 5/255, the paper's)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    args = p.parse_args(argv)
    return configure_and_run(p, lambda: Config(
        limit=args.limit, train_limit=args.train_limit, epochs=args.epochs, attack_steps=args.attack_steps,
        attack_lr=args.attack_lr, batch_size=args.batch_size), run, args.out)


if __name__ == "__main__":
    sys.exit(main())
