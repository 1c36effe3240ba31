"""The feature-space detector experiment (Table 2 of Wang, Hu, Su): configuration, report, end to end."""
from __future__ import annotations

import json

import pytest

from experiments.feature_detectors import ATTACKS, PAPER, Config, command, main, plot_auroc, report, target_check


def test_config_validates_every_field():
    assert Config().detectors == ("kd_pu", "lid", "mahalanobis")
    assert Config(subnets="runs/subnets").detectors[-1] == "subnet"
    assert Config(cdrp=True).detectors == ("kd_pu", "lid", "mahalanobis", "cdrp")
    for kw, msg in (({"models": ("resnet56",)}, "models"), ({"models": ("resnet20", "resnet20")}, "models"),
                    ({"models": ()}, "models"), ({"limit": 39}, "limit"), ({"train_limit": 0}, "train_limit"),
                    ({"limit": 1.5}, "limit"), ({"pu_passes": 1}, "pu_passes"), ({"runs": 0}, "runs"),
                    ({"batch_size": True}, "batch_size"), ({"seed": -1}, "seed"), ({"lid_rule": "first"}, "lid_rule"),
                    ({"cdrp": 1}, "cdrp")):
        with pytest.raises(ValueError, match=msg):
            Config(**kw)
    # the model list does not decide the cache: adding a model resumes the others'
    assert "models" not in Config().cache_key()
    assert Config(models=("resnet20",)).cache_key() == Config(models=("resnet20", "resnet32")).cache_key()
    # nor does the CDRP row: adding --cdrp reuses the cached attacks and features; nor --runs: more
    # reshuffled splits refit the regressions on the cached scores
    assert Config(cdrp=True).cache_key() == Config().cache_key() == Config(runs=5).cache_key()


def test_cli_errors_before_any_work(tmp_path, capsys):
    for argv, msg in ((["--models", "vgg16"], "models"), (["--limit", "39"], "limit"),
                      (["--cdrp", "--limit", "39"], "limit")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "o")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _result(mahalanobis_fgsm: float, models=("resnet20",)) -> dict:
    """A run's result in the shape :func:`run` writes, with made-up numbers."""
    cfg = Config(models=tuple(models), limit=200, train_limit=1000)
    dets = ("kd_pu", "lid", "mahalanobis")
    res = {"config": {**cfg.__dict__}, "run": "first 200 test images", "n_test": 200, "n_train": 1000,
           "command": command(cfg, "reports/detectors"), "models": {}}
    for m in models:
        r = {d: {a: 0.9 for a in ATTACKS} for d in dets}
        r["mahalanobis"]["fgsm"] = mahalanobis_fgsm
        r.update({f"{d}_std": {a: 0.0 for a in ATTACKS} for d in dets})
        r.update({"unknown": {d: {a: 0.8 for a in ATTACKS[1:]} for d in dets},
                  "n_selected": {a: 150 for a in ATTACKS}, "chosen_eps": {a: ["eps=0.002"] for a in ATTACKS},
                  "chosen_k": {a: ["k=20"] for a in ATTACKS}, "runs": 1, "lid_rule": "self",
                  "points": ["conv1", "layer1.2", "layer2.2", "layer3.2"]})
        att = {a: {"n": 200, "clean_correct": 160, "success_rate": 0.95, "median_l2": 0.5, "mean_l2": 0.6,
                   "noise_sigma": 0.01, "noisy_correct": 0.97} for a in ATTACKS}
        att["cw"]["median_l2"] = None
        res["models"][m] = {"result": r, "attacks": att, "clean_only": {a: 0.99 for a in ATTACKS},
                            "lid_other_rule": {"rule": "all", "known": {a: 0.7 for a in ATTACKS},
                                               "unknown": {a: 0.6 for a in ATTACKS[1:]}},
                            "seconds_total": 12.0, "seconds_this_run": 1.0}
    res["target"] = target_check(res)
    return res


def test_split_rows_follow_the_reference_block_split():
    from experiments.feature_detectors import split_rows

    assert split_rows(180) == {"fit": [9, 9, 9], "val": [9, 9, 9]}     # 18 per block: the slices stay inside
    assert split_rows(74) == {"fit": [1, 4, 4], "val": [6, 3, 3]}      # 7 per block: they cross block boundaries


def test_report_tables_and_target_statement(tmp_path):
    met = report(_result(0.97))
    assert "first 200 test images" in met and "--limit 200 --train-limit 1000" in met
    assert f"| KD+PU | 90.00 / {PAPER['kd_pu']['fgsm']:.2f} |" in met
    assert "| LID | 80.00 / 95.38 | 80.00 / 71.86 | 80.00 / 77.53 |" in met      # fitted on FGSM
    assert "| FGSM | 0.950 | 0.500 | 0.0100 | 0.970 | 150 of 200 | 5 / 8 / 8 | 10 / 7 / 7 | 0.002 | 20 |" in met
    assert "| CW | 0.950 | – |" in met
    assert "Yes: 0.9700" in met and "LID rule" in met and "PU by random gates" in met
    assert "Diagnostic: LID with the neighbour rule `all` (the reference code's" in met
    assert "FGSM 70.00, BIM 70.00, DeepFool 70.00, CW 70.00; fitted on FGSM: BIM 60.00" in met
    missed = report(_result(0.9))
    assert "No: 0.9000" in missed and "The gap to the paper: (1) the noisy twins" in missed
    assert "σ = 0.0100 per pixel, and only 97.0%" in missed and "noisy twins the same characteristics give 99.00%" in missed
    assert "in place of the noisy twins (same characteristics, split and ε choice): FGSM 99.00, BIM 99.00" in missed
    assert "in one split without reshuffles." in missed
    reshuffled = _result(0.9)
    reshuffled["models"]["resnet20"]["result"].update(runs=5, mahalanobis_std={a: 0.0123 for a in ATTACKS})
    assert "the AUROC the mean over 5 reshuffles of that split (std 1.23 points)." in report(reshuffled)
    other = _result(0.9, models=("resnet32",))
    assert other["target"] is None and "Not measured in this run" in report(other)
    both = _result(0.99, models=("resnet20", "resnet32"))
    text = report(both)
    assert "## resnet20" in text and "## resnet32" in text
    plot_auroc(both, tmp_path / "auroc.png")
    assert (tmp_path / "auroc.png").stat().st_size > 1000
    json.dumps(both)


def test_ours_row_in_both_tables_with_subnets(tmp_path, capsys):
    """With the subnet detector's results the report has an "Ours" row in the known- and unknown-attack
    tables and its ε choice; without them the row is left out.  --subnets is resolved per model."""
    from experiments.feature_detectors import subnets_dir

    res = _result(0.97)
    r = res["models"]["resnet20"]["result"]
    assert "Ours (subnet" not in report(res) and "Ours ε" not in report(res)
    r["subnet"] = {a: 0.95 for a in ATTACKS}
    r["subnet_std"] = {a: 0.0 for a in ATTACKS}
    r["unknown"]["subnet"] = {a: 0.85 for a in ATTACKS[1:]}
    r["chosen"] = {"subnet": {a: ["eps=0.0014"] for a in ATTACKS}}
    text = report(res)
    assert "| Ours (subnet Mahalanobis) | 95.00 / 99.97 | 95.00 / 99.17 | 95.00 / 91.91 | 95.00 / 96.88 |" in text
    assert "| Ours (subnet Mahalanobis) | 85.00 / 99.11 | 85.00 / 82.45 | 85.00 / 95.62 |" in text
    assert "| Mahalanobis ε | LID k | Ours ε |" in text and "| 0.002 | 20 | 0.0014 |" in text
    assert "- Ours: the class subnetworks given with `--subnets`" in text
    plot_auroc(res, tmp_path / "auroc.png")
    both = _result(0.97, models=("resnet20", "resnet32"))   # Ours for one of two models: a bar for that one
    both["models"]["resnet20"]["result"] = r
    plot_auroc(both, tmp_path / "auroc2.png")
    assert "| Ours (subnet Mahalanobis) |" in report(both)
    # --subnets DIR: DIR/<model>/subnets (the subnetwork experiment's cache), DIR/<model>, then DIR itself
    for folder in (tmp_path / "cache" / "resnet20" / "subnets", tmp_path / "one"):
        folder.mkdir(parents=True)
        (folder / "subnets.npz").write_bytes(b"")
    assert subnets_dir(str(tmp_path / "cache"), "resnet20") == tmp_path / "cache" / "resnet20" / "subnets"
    assert subnets_dir(str(tmp_path / "one"), "resnet32") == tmp_path / "one"
    # a model without subnetworks gets no Ours row; --subnets that serves no model is an error
    from experiments.feature_detectors import Config, found_subnets

    cfg = Config(models=("resnet20", "resnet32"), subnets=str(tmp_path / "cache"))
    assert found_subnets(cfg) == {"resnet20": tmp_path / "cache" / "resnet20" / "subnets"}
    res["config"]["subnets"] = str(tmp_path / "cache")
    del r["subnet"]
    assert "Ours: no class subnetworks of resnet20 were given" in report(res)
    with pytest.raises(SystemExit) as e:
        main(["--subnets", str(tmp_path / "cache"), "--models", "resnet32", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no subnets.npz for resnet32" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_feature_detectors_end_to_end(shared, tmp_path):
    """ResNet-20 on the first 200 shared test images, 200 training images, 2 stochastic passes: every
    number in range, the report written, a rerun served from the cache and other arguments refused."""
    from experiments.feature_detectors import run

    cfg = Config(models_dir=str(shared / "models/cifar10-resnet"), data=str(shared / "data/cifar10-jpeg"),
                 limit=200, train_limit=200, pu_passes=2)
    res = run(cfg, tmp_path / "det", log=lambda m: None)
    r = res["models"]["resnet20"]["result"]
    for d in ("kd_pu", "lid", "mahalanobis"):
        assert all(0.0 <= r[d][a] <= 1.0 for a in ATTACKS), (d, r[d])
        assert set(r["unknown"][d]) == set(ATTACKS[1:])
    assert all(r["n_selected"][a] >= 40 for a in ATTACKS)
    assert all(0.0 <= v <= 1.0 for v in res["models"]["resnet20"]["clean_only"].values())
    assert res["models"]["resnet20"]["lid_other_rule"]["rule"] == "all"
    assert (tmp_path / "det" / "README.md").read_text().startswith("# Feature-space adversarial detectors")
    assert json.loads((tmp_path / "det" / "detectors.json").read_text())["n_test"] == 200
    again = run(cfg, tmp_path / "det", log=lambda m: None)
    assert again["models"]["resnet20"]["result"] == r
    cached = sorted((tmp_path / "det" / "cache").rglob("*.npz"))
    stamps = [f.stat().st_mtime_ns for f in cached]
    three = run(Config(**{**cfg.__dict__, "runs": 3}), tmp_path / "det", log=lambda m: None)
    r3 = three["models"]["resnet20"]["result"]
    assert r3["runs"] == 3 and all(0.0 <= r3[d][a] <= 1.0 for d in ("kd_pu", "lid", "mahalanobis") for a in ATTACKS)
    assert [f.stat().st_mtime_ns for f in cached] == stamps   # attacks, features and scores reused
    with pytest.raises(ValueError, match="other arguments"):
        run(Config(**{**cfg.__dict__, "pu_passes": 3}), tmp_path / "det", log=lambda m: None)


def test_cdrp_row_in_both_tables(tmp_path):
    """With the cdrp detector's results (--cdrp) the report has a CDRP row in the known- and unknown-attack
    tables with "–" for the paper (which has no such row) and states how it differs from the DGR paper's
    detector; without them the row is left out and the report says so."""
    res = _result(0.97)
    r = res["models"]["resnet20"]["result"]
    plain = report(res)
    assert "| CDRP" not in plain and "the CDRP row unless asked for (`--cdrp`)" in plain
    assert "- CDRP: not in the paper's Table 2" not in plain
    r["cdrp"] = {a: 0.75 for a in ATTACKS}
    r["cdrp_std"] = {a: 0.0 for a in ATTACKS}
    r["unknown"]["cdrp"] = {a: 0.65 for a in ATTACKS[1:]}
    r["chosen"] = {"cdrp": {a: ["-"] for a in ATTACKS}}
    res["config"]["cdrp"] = True
    res["command"] = command(Config(limit=200, train_limit=1000, cdrp=True), "reports/detectors")
    text = report(res)
    assert "| CDRP (DGR routing paths) | 75.00 / – | 75.00 / – | 75.00 / – | 75.00 / – |" in text
    assert "| CDRP (DGR routing paths) | 65.00 / – | 65.00 / – | 65.00 / – |" in text
    assert "- CDRP: not in the paper's Table 2" in text and "logistic regression" in text
    assert "--cdrp" in res["command"]
    plot_auroc(res, tmp_path / "auroc.png")
    assert (tmp_path / "auroc.png").stat().st_size > 1000
