"""The command line as a user meets it: JSON results, one-line errors (exit 2)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxroute.cli.main import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
R20 = SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_info_lists_models_and_layout(capsys):
    assert main(["info", "--json"]) == 0
    names = [m["name"] for m in last_json(capsys)["models"]]
    for n in ("resnet20", "resnet32", "resnet44", "resnet56", "vgg16", "vgg16_bn_cifar", "alexnet", "resnet18",
              "resnet50", "digits_cnn"):
        assert n in names
    assert main(["info", "--model", "resnet20", "--json"]) == 0
    info = last_json(capsys)
    assert info["cdrp_size"] == 688 and info["gate_points"] == 19


def test_train_then_eval_digits(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["train", "--model", "digits_cnn", "--out", str(out), "--epochs", "20", "--no-progress",
                 "--json"]) == 0
    res = last_json(capsys)
    assert res["top1"] >= 0.97 and res["train_seconds"] < 60
    assert main(["eval", "--model", "digits_cnn", "--weights", str(out), "--data", "digits", "--json"]) == 0
    ev = last_json(capsys)
    assert ev["n"] == 360 and ev["top1"] == pytest.approx(res["top1"]) and 0 <= ev["top5"] <= 1
    # A checkpoint of one architecture is refused for another.
    assert main(["eval", "--model", "resnet20", "--weights", str(out)]) == 2
    assert "digits_cnn" in capsys.readouterr().err


@pytest.mark.skipif(not R20.exists(), reason=f"needs ../shared ({R20})")
def test_eval_pretrained_resnet20_on_cifar_jpeg(capsys):
    pytest.importorskip("torch")
    assert main(["eval", "--model", "resnet20", "--weights", str(R20), "--data", str(SHARED / "data/cifar10-jpeg"),
                 "--split", "test", "--limit", "500", "--json"]) == 0
    res = last_json(capsys)
    assert res["n"] == 500 and 0.74 < res["top1"] < 0.88 and res["top5"] > 0.95


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "nope"], "unknown model 'nope'"),
    (["eval", "--model", "resnet20", "--weights", "/no/such/file.th"], "not found"),
    (["eval", "--model", "digits_cnn", "--data", "/no/such/folder"], "/no/such/folder"),
    (["eval", "--model", "digits_cnn", "--data", "tfds:surely_not_a_dataset"], "surely_not_a_dataset"),
    (["eval", "--model", "resnet20", "--data", "digits"], "expects (32, 32, 3)"),
    (["route", "--model", "digits_cnn", "--out", "/tmp/x", "--batch-size", "7", "--shard-size", "10"], "multiple"),
])
def test_bad_input_is_a_one_line_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_corrupt_weights_and_empty_folder(tmp_path, capsys):
    bad = tmp_path / "w.th"
    bad.write_bytes(b"not a checkpoint at all")
    pytest.importorskip("torch")
    assert main(["eval", "--model", "resnet20", "--weights", str(bad)]) == 2
    assert "could not read" in capsys.readouterr().err
    (tmp_path / "empty" / "test").mkdir(parents=True)
    assert main(["eval", "--model", "digits_cnn", "--data", str(tmp_path / "empty")]) == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "jaxroute.cli.main", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "resnet20" in out.stdout
