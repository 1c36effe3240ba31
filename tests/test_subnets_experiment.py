"""The class-subnetwork experiment (Wang, Hu, Su §4-§5.1): configuration, pieces, end to end on a tiny run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.subnets import (METHODS, Config, closed_points, command, cosine_dissimilarity, embed_2d, main,
                                 report, run, run_label, separability, within_between)

STAGES = ("subnets", "auc", "seeds", "seed_embedding", "features", "feature_embedding", "grid", "localize")


def test_config_validates_every_field():
    assert Config().methods == METHODS and Config().models == ("resnet20", "resnet32")
    assert Config(methods=("smoothgrad", "gradient")).methods == ("gradient", "smoothgrad")   # the table's order
    for kw, msg in (({"models": ("resnet56",)}, "models"), ({"models": ()}, "models"),
                    ({"methods": ("lrp",)}, "methods"), ({"methods": ("gradient", "gradient")}, "methods"),
                    ({"seeds": 1}, "seeds"), ({"train_limit": 10}, "train_limit"),
                    ({"seed_train_limit": 0}, "seed_train_limit"), ({"test_limit": 1.5}, "test_limit"),
                    ({"grid_images": 11}, "grid_images"), ({"epochs": 0}, "epochs"), ({"subnet_batch": True},
                                                                                        "subnet_batch"),
                    ({"eps": 0.0}, "eps"), ({"eps": float("nan")}, "eps"), ({"embedding": "tsne"}, "embedding"),
                    ({"permutations": 0}, "permutations"), ({"seed": -1}, "seed"), ({"n_test_canvases": 0},
                                                                                     "n_test_canvases")):
        with pytest.raises(ValueError, match=msg):
            Config(**kw)
    assert "models" not in Config().cache_key()


def test_cache_key_records_the_shared_paths_relative_to_the_repository(tmp_path):
    from experiments.common import REPO, portable_path

    # a committed cache must match in any clone with ../shared beside it
    key = Config().cache_key()
    assert key["data"] == "../shared/data/cifar10-jpeg" and key["models_dir"] == "../shared/models/cifar10-resnet"
    assert portable_path(REPO / "reports") == "reports"
    outside = tmp_path.resolve()
    if not outside.is_relative_to(REPO.parent):
        assert portable_path(outside) == str(outside)


def test_run_label_and_command_name_every_limit():
    full = Config()
    assert run_label(full).startswith("full run (") and command(full, "r") == \
        "python -m experiments.subnets --out r --models resnet20,resnet32"
    quick = Config(models=("resnet20",), train_limit=2000, test_limit=500, seeds=2, epochs=2, methods=("gradient",))
    assert run_label(quick).startswith("quick run (--train-limit 2000, --test-limit 500, --epochs 2, --methods gradient")
    assert command(quick, "r") == ("python -m experiments.subnets --out r --models resnet20 --train-limit 2000 "
                                   "--test-limit 500 --seeds 2 --epochs 2 --methods gradient")
    every = Config(seed_train_limit=None)
    assert "--seed-train-limit all" in run_label(every) and command(every, "r").endswith("--seed-train-limit all")


def test_cli_errors_before_any_work(tmp_path, capsys):
    for argv, msg in ((["--models", "vgg16"], "models"), (["--seeds", "1"], "seeds"),
                      (["--methods", "gradient,lrp"], "methods"), (["--seed-train-limit", "many"], "'all'")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "o")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cosine_dissimilarity_and_within_between():
    v = np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 0, 0]])
    d = cosine_dissimilarity(v)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert d[0, 1] == pytest.approx(0) and d[0, 2] == pytest.approx(1) and d[0, 3] == pytest.approx(1)
    within, between = within_between(d, [0, 0, 1, 1])
    assert within == pytest.approx((0 + 1) / 2) and between == pytest.approx(1.0)


def test_closed_points_name_the_gate_points_with_every_gate_zero():
    from jaxroute.models.gates import GateSpec

    spec = GateSpec(("a", "b", "c"), (2, 3, 1))
    gates = np.array([[0, 0, 0, 0.5, 0, 0], [1, 0, 0, 0, 0, 2]])
    assert closed_points(gates, spec) == [["a", "c"], ["b"]]


def test_separability_keeps_pairs_in_one_fold_and_separates_separable_features():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(20, 4))
    x = np.concatenate([clean, clean + 5.0])
    y = np.repeat([0, 1], 20)
    s = separability(x, y, np.tile(np.arange(20), 2), seed=0)
    assert s["logreg_accuracy"] == pytest.approx(1.0) and s["silhouette"] > 0.5 and s["n"] == 40
    assert separability(x[:8], y[:8], np.arange(8) % 4, seed=0)["logreg_accuracy"] is None   # 4 groups < 5 folds


def test_pca_embedding_is_two_dimensional_and_seeded():
    x = np.random.default_rng(0).normal(size=(12, 5))
    e = embed_2d(x, method="pca", seed=0)
    assert e.shape == (12, 2) and np.array_equal(e, embed_2d(x, method="pca", seed=0))


@pytest.mark.slow
def test_umap_embedding_is_two_dimensional_and_seeded():
    """UMAP's numba kernels compile on first use (about a minute of CPU), hence slow."""
    pytest.importorskip("umap", reason="umap-learn is the experiments extra: pip install -e '.[experiments]'")
    x = np.random.default_rng(0).normal(size=(30, 5))
    e = embed_2d(x, method="umap", seed=0, metric="cosine")
    assert e.shape == (30, 2) and np.all(np.isfinite(e))
    assert np.allclose(e, embed_2d(x, method="umap", seed=0, metric="cosine"))


def test_subnets_experiment_end_to_end_resumes_and_refuses_other_arguments(shared_dir, tmp_path):
    """ResNet-20 on 200 training and 20 test images, 2 seeds of one short epoch, one saliency method: every file
    written with numbers in range, a rerun served from the cache, a cache of other arguments refused, and the
    README rendered again from the JSON."""
    cfg = Config(models_dir=str(shared_dir / "models/cifar10-resnet"), data=str(shared_dir / "data/cifar10-jpeg"),
                 wordnet=str(shared_dir / "data/wordnet"), models=("resnet20",), train_limit=200, test_limit=20,
                 seeds=2, seed_train_limit=100, n_train_canvases=8, n_test_canvases=8, grid_images=2, epochs=1,
                 subnet_batch=8, methods=("gradient",), embedding="pca", permutations=99)
    out = tmp_path / "subnets"
    res = run(cfg, out, log=lambda m: None)
    m = res["models"]["resnet20"]
    for f in ("README.md", "subnets.json", *m["figures"].values()):
        assert (out / f).stat().st_size > 100, f
    assert len(m["classes"]) == 10 and all(0 <= r["sparsity"] <= 1 for r in m["classes"])
    assert all(r["selected_epoch"] == 1 and 0 <= r["auc_subnet"] <= 1 for r in m["classes"])
    assert all(isinstance(r["closed_points"], list) for r in m["classes"])
    assert set(m["checks"]) == {"auc", "sparsity"} and isinstance(m["checks"]["auc"]["passed"], bool)
    t = m["dendrogram"]
    assert np.asarray(t["matrix"]).shape == (10, 10) and sorted(t["leaf_order"]) == sorted(res["class_names"])
    assert t["pairs"] == 45 and -1 <= t["spearman_rho"] <= 1 and 0 < t["mantel_p"] <= 1
    assert m["seeds"]["n_seeds"] == 2 and len(m["seeds"]["sparsity_mean_per_seed"]) == 2
    assert m["seeds"]["n_train"] == 100 and (out / "cache/resnet20/subnets_100_seed0/subnets.npz").is_file()
    assert -1 <= m["seeds"]["silhouette_by_class"] <= 1
    f = m["fig2"]
    assert f["n_images"] == 20 and f["feature_dim"] == 64 and f["n_selected"] >= 5
    assert all(0 <= f[s]["logreg_accuracy"] <= 1 for s in ("full", "subnet"))
    assert list(m["table1"]) == ["gradient"] and all(0 <= v["err"] <= 100 for v in m["table1"]["gradient"].values())
    assert len(m["grid_images"]) == 2
    saved = json.loads((out / "subnets.json").read_text())
    assert saved["models"]["resnet20"]["fig2"] == json.loads(json.dumps(f))
    assert report(saved) == (out / "README.md").read_text()
    text = report(saved)
    assert "quick run (--train-limit 200, --test-limit 20" in text and "PASS" in text or "FAIL" in text
    assert "| Gradient |" in text and "48.01 → 44.21" in text and "Mantel p" in text

    again = run(cfg, out, log=lambda m: None)
    assert again["models"]["resnet20"] == m
    spent = {s: again["timings"]["this_run"].get(f"{s}_resnet20", 0.0) for s in STAGES}
    assert sum(spent.values()) < 5, spent   # every stage read from the cache
    assert again["timings"]["total"]["subnets_resnet20"] >= res["timings"]["total"]["subnets_resnet20"]
    with pytest.raises(ValueError, match="other arguments"):
        run(Config(**{**cfg.__dict__, "seed": 1}), out, log=lambda m: None)
    # another method list reuses the cache: only the new method's grid and table row are computed
    more = run(Config(**{**cfg.__dict__, "methods": ("gradient", "grad_cam")}), out, log=lambda m: None)
    assert list(more["models"]["resnet20"]["table1"]) == ["gradient", "grad_cam"]
    assert more["models"]["resnet20"]["table1"]["gradient"] == m["table1"]["gradient"]
    assert sum(v for k, v in more["timings"]["this_run"].items()
               if k not in ("data", "grid_resnet20", "localize_resnet20")) < 5
    assert "Not in this run (`--methods`): Deconvnet, Guided BP, Integrated gradients, SmoothGrad." in \
        (out / "README.md").read_text()
