"""The command line as a user meets it: JSON results, one-line errors (exit 2)."""
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxroute.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
def test_train_then_eval_digits(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["train", "--model", "digits_cnn", "--out", str(out), "--epochs", "20", "--no-progress",
                 "--json"]) == 0
    res = last_json(capsys)
    assert res["top1"] >= 0.97 and res["n"] == 360 and res["n_train"] == 1437
    assert main(["eval", "--model", "digits_cnn", "--weights", str(out), "--data", "digits", "--json"]) == 0
    ev = last_json(capsys)
    assert ev["n"] == 360 and ev["top1"] == pytest.approx(res["top1"]) and 0 <= ev["top5"] <= 1
    # A checkpoint of one architecture is refused for another.
    assert main(["eval", "--model", "resnet20", "--weights", str(out)]) == 2
    assert "digits_cnn" in capsys.readouterr().err


def test_eval_pretrained_resnet20_on_cifar_jpeg(cifar_resnet_ckpt, cifar10_jpeg, capsys):
    r20 = cifar_resnet_ckpt("resnet20")
    pytest.importorskip("torch")
    assert main(["eval", "--model", "resnet20", "--weights", str(r20), "--data", str(cifar10_jpeg),
                 "--split", "test", "--limit", "500", "--json"]) == 0
    res = last_json(capsys)
    assert res["n"] == 500 and 0.74 < res["top1"] < 0.88 and res["top5"] > 0.95


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "nope"], "unknown model 'nope'"),
    (["eval", "--model", "resnet20", "--weights", "/no/such/file.th"], "not found"),
    (["eval", "--model", "digits_cnn", "--data", "/no/such/folder"], "/no/such/folder"),
    (["eval", "--model", "digits_cnn", "--data", "tfds:surely_not_a_dataset"], "surely_not_a_dataset"),
    (["eval", "--model", "resnet20", "--data", "digits"], "expects (32, 32, 3)"),
])
def test_bad_input_is_a_one_line_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--momentum", "1"], "momentum must be in [0, 1)"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--gamma", "-1"], "gamma must be >= 0"),
    (["--clip-min", "3", "--clip-max", "2"], "clip_min < clip_max"),
    (["--method", "awr", "--prune-frac", "1.5"], "pruning fraction must be in (0, 1)"),
    (["--memory-budget", "lots"], "cannot read a memory size"),
    (["--init-timeout", "0", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"],
     "--init-timeout must be >= 1"),
    (["--coordinator", "127.0.0.1:1"], "--coordinator needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, 2)"),
])
def test_route_bad_options_are_one_line_errors(extra, needle, tmp_path, capsys):
    out = tmp_path / "routes"
    argv = ["route", "--model", "digits_cnn", "--data", "digits", "--limit", "8", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()                        # no work done


def test_route_output_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import jaxroute.cli.main as cli

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "model_from_args", no_loading)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in ((afile, "exists and is not a directory"), (afile / "sub", "cannot write to the output")):
        assert main(["route", "--model", "digits_cnn", "--data", "digits", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(out) in err and "Traceback" not in err


def test_route_dgr_flags_default_to_the_config_defaults(digits_ckpt, tmp_path, capsys):
    from jaxroute.routing import DGRConfig, PruneConfig

    base = ["route", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit", "8",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    job = json.loads((tmp_path / "a" / "manifest.json").read_text())["job"]
    assert job["method"] == "dgr" and job["config"] == dataclasses.asdict(DGRConfig())
    assert main(base + ["--out", str(tmp_path / "b"), "--gamma", "0.1", "--steps", "5"]) == 0
    job = json.loads((tmp_path / "b" / "manifest.json").read_text())["job"]
    assert job["config"] == dataclasses.asdict(DGRConfig(gamma=0.1, steps=5))
    assert main(base + ["--out", str(tmp_path / "c"), "--method", "aar", "--prune-frac", "0.1"]) == 0
    job = json.loads((tmp_path / "c" / "manifest.json").read_text())["job"]
    assert job["method"] == "aar" and job["config"] == dataclasses.asdict(PruneConfig(frac=0.1))


def test_router_names_match_the_routers():
    """The parser names the routers without importing JAX; the names are the library's."""
    from jaxroute.cli.main import ROUTER_NAMES, build_parser
    from jaxroute.routing import ROUTERS

    assert sorted(ROUTER_NAMES) == sorted(ROUTERS)
    route = next(a for a in build_parser()._subparsers._group_actions[0].choices["route"]._actions
                 if a.dest == "method")
    assert list(route.choices) == sorted(ROUTERS) and route.default == "dgr"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_route_unreachable_coordinator_is_a_one_line_error(tmp_path):
    """A process that cannot reach its coordinator waits --init-timeout seconds, then ends with one line."""
    addr = f"127.0.0.1:{_free_port()}"                                 # nobody listens there
    out = subprocess.run([sys.executable, "-m", "jaxroute.cli.main", "route", "--model", "digits_cnn",
                          "--data", "digits", "--limit", "8", "--out", str(tmp_path / "r"), "--coordinator", addr,
                          "--num-processes", "2", "--process-id", "1", "--init-timeout", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxroute route: error:") and addr in last and "within 2 s" in last
    assert "Traceback" not in out.stderr and "Check failure" not in out.stderr


def test_corrupt_weights_and_empty_folder(tmp_path, capsys):
    bad = tmp_path / "w.th"
    bad.write_bytes(b"not a checkpoint at all")
    pytest.importorskip("torch")
    assert main(["eval", "--model", "resnet20", "--weights", str(bad)]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err
    (tmp_path / "empty" / "test").mkdir(parents=True)
    assert main(["eval", "--model", "digits_cnn", "--data", str(tmp_path / "empty")]) == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "jaxroute.cli.main", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "resnet20" in out.stdout


# --------------------------------------------------------------------------- attack
def attack_argv(weights, out, method, *extra):
    return ["attack", "--model", "digits_cnn", "--weights", str(weights), "--data", "digits", "--split", "test",
            "--limit", "20", "--method", method, "--out", str(out), "--json", *extra]


@pytest.mark.parametrize("method, extra, linf_max", [
    ("fgsm", ["--eps", "0.1"], 0.1),
    ("ifgsm", ["--eps", "0.02", "--steps", "5"], 5 * 0.02),           # DGR Eq. 6: step eps, no eps-ball
    ("pgd_linf", ["--eps", "0.05", "--steps", "5"], 0.05),
    ("pgd_l2", ["--eps", "0.5", "--steps", "5"], None),
    ("deepfool", ["--steps", "10"], None),
    ("cw_l2", ["--steps", "20"], None),
    # the library's lam = 0.1*255 (tuned for 32x32x3 inputs) keeps 8x8 digits clean: success 0
    ("ensemble", ["--steps", "20", "--lam", "1"], None),
])
def test_attack_every_method_saves_arrays_and_json(digits_ckpt, tmp_path, capsys, method, extra, linf_max):
    import numpy as np

    out = tmp_path / method
    assert main(attack_argv(digits_ckpt, out, method, *extra)) == 0
    res = last_json(capsys)
    for k in ("n", "success_rate", "mean_linf", "mean_l2", "clean_top1", "adv_top1"):
        assert k in res, k
    assert res["n"] == 20 and res["method"] == method
    z = np.load(out / "test.npz")
    x_adv, labels = z["images"], z["labels"]
    assert x_adv.shape == (20, 8, 8, 1) and x_adv.dtype == np.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # the summary is computed from the saved arrays
    assert res["success_rate"] == pytest.approx(float(z["success"].mean()))
    assert res["mean_l2"] == pytest.approx(float(z["l2"].mean()), rel=1e-5)
    assert res["adv_top1"] == pytest.approx(float(np.mean(z["adv_pred"] == labels)))
    assert res["adv_top1"] < res["clean_top1"]
    if linf_max is not None:
        assert res["mean_linf"] <= linf_max + 1e-6 and float(z["linf"].max()) <= linf_max + 1e-6
    if method == "pgd_l2":
        assert float(z["l2"].max()) <= 0.5 + 1e-5
    if method == "ensemble":                      # always targeted: the least-likely class by default
        assert res["target"] == "least_likely" and np.all(z["target"] != z["clean_pred"])
        assert res["success_rate"] >= 0.5
        np.testing.assert_array_equal(z["success"], z["adv_pred"] == z["target"])
    else:                                         # untargeted from the true label
        assert np.all(z["target"] == -1)
        np.testing.assert_array_equal(z["success"], z["adv_pred"] != labels)


def test_attack_targets_and_seed(digits_ckpt, tmp_path, capsys):
    import numpy as np

    runs = {}
    for name, extra in [("a", ["--seed", "1"]), ("b", ["--seed", "1"]), ("c", ["--seed", "2"])]:
        out = tmp_path / name
        assert main(attack_argv(digits_ckpt, out, "ifgsm", "--target", "random", "--steps", "3", *extra)) == 0
        res = last_json(capsys)
        assert res["target"] == "random" and res["seed"] == int(extra[1])
        runs[name] = np.load(out / "test.npz")
    t = runs["a"]["target"]
    np.testing.assert_array_equal(t, runs["b"]["target"])             # same seed, same targets
    assert not np.array_equal(t, runs["c"]["target"])                   # another seed, other targets
    assert np.all(t != runs["a"]["labels"]) and t.min() >= 0 and t.max() < 10
    np.testing.assert_array_equal(runs["a"]["success"], runs["a"]["adv_pred"] == t)   # targeted success
    out = tmp_path / "ll"
    assert main(attack_argv(digits_ckpt, out, "fgsm", "--target", "least_likely")) == 0
    z = np.load(out / "test.npz")
    assert np.all(z["target"] != z["labels"]) and np.all(z["target"] >= 0)


@pytest.mark.parametrize("extra, needle", [
    (["--method", "deepfool", "--eps", "0.1"], "--eps applies to"),
    (["--method", "deepfool", "--target", "random"], "deepfool is untargeted"),
    (["--method", "fgsm", "--eps", "8"], "[0, 1] pixel units"),
    (["--method", "fgsm", "--steps", "3"], "fgsm is a single step"),
    (["--method", "ifgsm", "--alpha", "0.1"], "--alpha"),
    (["--method", "cw_l2", "--lam", "1"], "--lam"),
])
def test_attack_bad_options_are_one_line_errors(extra, needle, tmp_path, capsys):
    argv = ["attack", "--model", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()                                # checked before any work


def test_attack_pretrained_resnet20_on_cifar_jpeg(cifar_resnet_ckpt, cifar10_jpeg, tmp_path, capsys):
    r20 = cifar_resnet_ckpt("resnet20")
    pytest.importorskip("torch")
    assert main(["attack", "--model", "resnet20", "--weights", str(r20), "--data", str(cifar10_jpeg),
                 "--split", "test", "--limit", "20", "--method", "pgd_linf", "--eps", str(4 / 255),
                 "--steps", "5", "--out", str(tmp_path / "adv"), "--json"]) == 0
    res = last_json(capsys)
    assert res["n"] == 20 and 0.6 <= res["clean_top1"] <= 1.0
    assert res["success_rate"] >= 0.9 and res["adv_top1"] <= 0.1 and res["mean_linf"] <= 4 / 255 + 1e-6


def test_route_pretrained_resnet20_streams_cifar_jpeg(cifar_resnet_ckpt, cifar10_jpeg, tmp_path, capsys,
                                                     monkeypatch):
    """`jaxroute route` on an ImageFolder reads the decoded pixels from the cache a batch at a time."""
    r20 = cifar_resnet_ckpt("resnet20")
    pytest.importorskip("torch")
    from jaxroute.data.stored import StoredImages

    reads = []
    real = StoredImages.read_uint8
    monkeypatch.setattr(StoredImages, "read_uint8", lambda self: reads.append(len(self)) or real(self))
    assert main(["route", "--model", "resnet20", "--weights", str(r20), "--data", str(cifar10_jpeg),
                 "--split", "test", "--limit", "24", "--steps", "3", "--batch-size", "4", "--shard-size", "8",
                 "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "routes"), "--json",
                 "--no-progress"]) == 0
    res = last_json(capsys)
    assert res["n"] == 24 and res["top1_agreement"] >= 0.9
    assert sum(reads) == 24 and max(reads) <= 4 * __import__("jax").local_device_count()
