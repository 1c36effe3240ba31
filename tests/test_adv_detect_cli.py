"""``jaxroute adv-detect``: the feature-space detector protocol from the command line."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_adv_detect_cli(digits_ckpt, tmp_path, capsys):
    """The whole protocol on the trained digits CNN (DeepFool: nearly every image is selected), the CDRP
    row (DGR with 5 steps) beside the others; the characteristics are cached; bad input exits 2 with one line."""
    import json

    from jaxroute.cli.main import main

    out = tmp_path / "det"
    argv = ["adv-detect", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits",
            "--limit", "150", "--train-limit", "500", "--attacks", "deepfool",
            "--detectors", "mahalanobis,lid,kd_pu,cdrp", "--dgr-steps", "5", "--eps", "0,0.005", "--lid-k", "10,20", "--pu-passes", "5", "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_selected"]["deepfool"] >= 100
    for d in ("mahalanobis", "lid", "kd_pu", "cdrp"):
        assert 0.0 <= res[d]["deepfool"] <= 1.0
    assert res["dgr"]["steps"] == 5 and res["chosen"]["cdrp"]["deepfool"] == ["-"]
    assert res["chosen_eps"]["deepfool"][0] in ("eps=0", "eps=0.005")
    assert res["chosen_k"]["deepfool"][0] in ("k=10", "k=20")
    for f in ("scores/mahalanobis-deepfool.npz", "scores/lid-deepfool.npz", "scores/kd_pu-deepfool.npz",
              "scores/cdrp-clean.npz", "scores/cdrp-deepfool.npz", "attacks/deepfool.npz",
              "features/train/manifest.json", "result.json"):
        assert (out / f).exists(), f
    for bad, msg in ((["--detectors", "lid", "--lid-k", "10,30"], "other settings"),
                     (["--limit", "30", "--out", str(tmp_path / "few")], "at least 40")):
        assert main(argv + bad) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("jaxroute adv-detect: error:") and msg in last, last


def test_adv_detect_cli_errors(tmp_path, capsys):
    """Argument errors end with one line and exit 2 before any model is loaded."""
    from jaxroute.cli.main import main

    argv = ["adv-detect", "--model", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "o")]
    for bad, msg in ((["--detectors", "nope"], "unknown detector"), (["--detectors", "subnet"], "--subnets"),
                     (["--attacks", "pgd"], "unknown attack"), (["--runs", "0"], "--runs"),
                     (["--detectors", "cdrp,nope"], "unknown detector(s) ['nope']"),
                     (["--detectors", "cdrp", "--cdrp-classifier", "svm"], "unknown cdrp classifier"),
                     (["--detectors", "cdrp", "--dgr-steps", "0"], "DGR steps")):
        assert main(argv + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("jaxroute adv-detect: error:") and msg in err[0], err
