"""Routing a data set through the extraction job, as the command line and the library run it:
shards, manifest, resume after a kill, devices, processes, streaming input."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxroute.cli.main import main
from jaxroute.routing import DGRConfig, Route
from jaxroute.extraction import load_shards

ROOT = Path(__file__).resolve().parents[1]


def route_args(ckpt, out, *extra):
    return ["route", "--model", "digits_cnn", "--weights", str(ckpt), "--data", "digits", "--split", "test",
            "--out", str(out), "--batch-size", "20", "--shard-size", "40", "--no-progress",
            *extra]


def run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxroute.cli.main", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def assert_same_outputs(a, b):
    sa, sb = load_shards(a), load_shards(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.fixture(scope="module")
def reference_run(digits_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "routes"
    assert main(route_args(digits_ckpt, out)) == 0
    return out


def test_route_outputs_and_json(digits_ckpt, reference_run, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(route_args(digits_ckpt, out, "--limit", "60", "--json")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    for key in ("n", "top1_agreement", "top5_accuracy", "sparsity", "images_per_s", "fallback_fraction"):
        assert key in res
    assert res["n"] == 60 and res["top1_agreement"] == 1.0 and 0 < res["sparsity"] < 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_shards"] == 2 and manifest["num_samples"] == 60
    assert manifest["extra"]["cdrp_size"] == 224
    assert [l["offset"] for l in manifest["extra"]["layout"]] == [0, 32, 96]
    assert manifest["job"]["method"] == "dgr" and manifest["job"]["config"] == dataclasses.asdict(DGRConfig())
    assert manifest["plan"]["batch_size"] == 20 and manifest["plan"]["shard_size"] == 40
    with np.load(out / "shard-00001.npz") as z:  # plain numpy, no jaxroute needed
        assert z["cdrp"].shape == (20, 224) and list(z["index"]) == list(range(40, 60))
        assert set(z.files) == {"index", "label", "input_crc32", "features", *Route._fields}
        assert z["features"].shape == (20, 128) and z["full_logits"].shape == (20, 10)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 60 and summary["method"] == "dgr" and summary["top1_agreement"] == 1.0
    # The first 60 of the full run are the same samples with the same gates.
    full = load_shards(reference_run)
    np.testing.assert_array_equal(load_shards(out)["cdrp"], full["cdrp"][:60])


def test_resume_after_kill_is_identical(digits_ckpt, reference_run, tmp_path, monkeypatch):
    # the killed CLI process has one device per core, this one a single device: fix the conv
    # formulation for both, else the resume is (rightly) refused as computed another way
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "canonical")
    out = tmp_path / "killed"
    p = run_cli(route_args(digits_ckpt, out))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.npz"))) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(list(out.glob("shard-*.npz")))
    assert 3 <= n_before < 9, "the job should have been killed part-way"
    assert main(route_args(digits_ckpt, out)) == 0
    assert len(list(out.glob("shard-*.npz"))) == 9
    assert_same_outputs(out, reference_run)


def test_changed_arguments_are_refused(digits_ckpt, reference_run, capsys):
    n_shards = len(list(reference_run.glob("shard-*.npz")))
    assert main(route_args(digits_ckpt, reference_run, "--gamma", "0.1")) == 2
    err = capsys.readouterr().err
    assert "another job" in err and "job.config.gamma: output has 0.05, this run 0.1" in err
    assert main(route_args(digits_ckpt, reference_run, "--method", "awr")) == 2
    err = capsys.readouterr().err
    assert "another job" in err and "job.method: output has 'dgr', this run 'awr'" in err
    assert main(route_args(digits_ckpt, reference_run, "--limit", "100")) == 2
    assert "num_samples: output has 360, this run 100" in capsys.readouterr().err
    assert len(list(reference_run.glob("shard-*.npz"))) == n_shards      # nothing was mixed in


def test_four_devices_give_the_same_results(digits_ckpt, reference_run, tmp_path):
    def args(out):  # --batch-size is per device: 4 devices x 10 = one shard of 40 per step
        a = route_args(digits_ckpt, out)
        a[a.index("--batch-size") + 1] = "10"
        return a

    p = run_cli(args(tmp_path / "dev4"), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "on 4 local device(s)" in stderr
    assert main(args(tmp_path / "dev1")) == 0
    assert_same_outputs(tmp_path / "dev4", tmp_path / "dev1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed(digits_ckpt, reference_run, tmp_path):
    out = tmp_path / "mp"
    addr = f"127.0.0.1:{_free_port()}"
    procs = [run_cli(route_args(digits_ckpt, out, "--coordinator", addr, "--num-processes", "2",
                                "--process-id", str(i), "--json")) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se
    assert_same_outputs(out, reference_run)
    summary = json.loads(results[0][0].strip().splitlines()[-1])
    assert summary["n"] == 360


def test_memory_budget_picks_a_batch_that_fits(digits_model):
    from jaxroute.extraction import batch_size_for_memory, parse_bytes
    from jaxroute.routing import route_outputs

    router = route_outputs(digits_model, "dgr")
    small, big = (batch_size_for_memory(router, (8, 8, 1), parse_bytes(b)) for b in ("4MB", "16MB"))
    assert 1 <= small < big
    # The extrapolation holds: the program compiled at the chosen size fits the budget.
    import jax, numpy as np

    ma = router.lower(jax.ShapeDtypeStruct((big, 8, 8, 1), np.float32)).compile().memory_analysis()
    used = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
            + getattr(ma, "generated_code_size_in_bytes", 0))
    assert used <= 16 * 2**20
    with pytest.raises(ValueError, match="cannot hold one sample"):
        batch_size_for_memory(router, (8, 8, 1), 1000)


def test_attack_route_detect_pipeline(digits_ckpt, tmp_path, capsys):
    """jaxroute attack -> route (adversarial arrays as a data set) -> detect, as a user chains them."""
    outs = {}
    for split, limit in (("train", "100"), ("test", "60")):
        adv = tmp_path / f"adv-{split}"
        assert main(["attack", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits",
                     "--split", split, "--limit", limit, "--method", "ifgsm", "--eps", "0.01", "--steps", "10",
                     "--target", "random", "--out", str(adv), "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["n"] == int(limit) and res["mean_linf"] <= 0.1 + 1e-6 and res["adv_top1"] < res["clean_top1"]
        for kind, data in (("real", "digits"), ("adv", str(adv))):
            out = tmp_path / f"{kind}-{split}"
            args = route_args(digits_ckpt, out)
            args[args.index("--data") + 1] = data
            args[args.index("--split") + 1] = split
            assert main(args + ["--limit", limit]) == 0
            outs[f"{kind}_{split}"] = out
    capsys.readouterr()
    assert main(["detect", "--train-real", str(outs["real_train"]), "--train-adv", str(outs["adv_train"]),
                 "--test-real", str(outs["real_test"]), "--test-adv", str(outs["adv_test"]), "--sizes", "5,10",
                 "--runs", "2", "--classifiers", "random_forest", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.5 < res["random_forest"]["auc_mean"] <= 1.0
    # Twins must line up: a test set of another size is refused.
    assert main(["detect", "--train-real", str(outs["real_train"]), "--train-adv", str(outs["adv_test"]),
                 "--test-real", str(outs["real_test"]), "--test-adv", str(outs["adv_test"])]) == 2


def test_small_data_set_gets_a_batch_it_fills(digits_ckpt, tmp_path):
    """--batch-size larger than the data: the job routes at the size the data fills, no padding."""
    import jax

    out = tmp_path / "small"
    argv = ["route", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--split", "test",
            "--limit", "10", "--out", str(out), "--steps", "3", "--no-progress"]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    fit = -(-10 // jax.device_count())
    assert m["plan"]["batch_size"] == fit and m["plan"]["shard_size"] % (fit * m["devices"]) == 0
    assert len(load_shards(out)["index"]) == 10
    assert main(argv) == 0                     # a rerun resumes with the same effective batch


def test_streaming_input_routes_the_same_and_reads_per_batch(digits_ckpt, digits_model, tmp_path, monkeypatch):
    """A data set whose images stay on disk (StoredImages, what `jaxroute route` gets from an
    ImageFolder) gives the same shards as the same images in memory, read a batch at a time."""
    from jaxroute.data import Dataset
    from jaxroute.data.stored import StoredImages, save_stored_images
    from jaxroute.extraction import plan_batches
    from jaxroute.routing import route_dataset

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    save_stored_images(tmp_path / "x.npy", pixels)
    labels = rng.integers(0, 10, 50).astype(np.int32)
    names = tuple(str(i) for i in range(10))
    plan = plan_batches(50, 8, 16)
    kw = dict(plan=plan, method="dgr", config=DGRConfig(steps=5), source={"weights": str(digits_ckpt)},
              progress=False)
    in_memory = Dataset(pixels.astype(np.float32) / np.float32(255), labels, names, "x")
    s_mem = route_dataset(digits_model, in_memory, tmp_path / "mem", **kw)
    reads = []
    real = StoredImages.read_uint8
    monkeypatch.setattr(StoredImages, "read_uint8", lambda self: reads.append(len(self)) or real(self))
    s_disk = route_dataset(digits_model, Dataset(StoredImages(tmp_path / "x.npy"), labels, names, "x"),
                           tmp_path / "disk", **kw)
    assert_same_outputs(tmp_path / "mem", tmp_path / "disk")
    assert sum(reads) == 50 and max(reads) <= plan.global_batch  # never more than one batch in memory
    assert s_mem["n"] == s_disk["n"] == 50 and s_mem["sparsity"] == s_disk["sparsity"]
