"""Bad input on every ``jaxroute`` subcommand: exit 2, one line on stderr, never a traceback.

The cases are generated from the parser itself (:func:`jaxroute.cli.main.build_parser`), so
a new subcommand or option is fuzzed as soon as it exists -- and a test below fails until its
minimal valid arguments (:data:`VALID`) and, for a free-text option, its bad values
(:data:`STRING_CASES`) are listed here.  Each case appends one bad value (or a pair, for a
wrong model/weights pairing) to a subcommand's minimal valid command line; the later
occurrence of an option wins in argparse, so only that value is wrong.

Bad-value classes: missing path, unwritable path (a path under a regular file, the file
itself, and -- when not root, where permission bits do not stop writes -- a read-only
folder), wrong type (argparse: exit 2 with its usage lines and one error line), NaN/inf/
negative numbers, wrong model/weights pairing, corrupt files (random-bytes ``.th``,
truncated ``.npz`` data and adversarial sets, damaged checkpoints, shards, colour tables, concept sets and
WordNet files).  The outputs the previous valid runs
wrote into the same ``--out`` folders must be byte-identical afterwards.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxroute.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# Minimal valid arguments of every subcommand: fast (digits CNN, 8 images, tiny steps).
# ``<name>`` tokens are paths from the ``ctx`` fixture.
VALID: dict[str, list[str]] = {
    "info": ["info", "--model", "digits_cnn"],
    "eval": ["eval", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8"],
    # fine-tunes the checkpoint: a random initialisation would compile the init on every case
    "train": ["train", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--epochs", "1",
              "--batch-size", "8", "--out", "<trained>", "--overwrite", "--no-progress"],
    "convert": ["convert", "--model", "digits_cnn", "--weights", "<torch_file>", "--out", "<converted>",
                "--overwrite"],
    "route": ["route", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--steps", "2",
              "--batch-size", "2", "--shard-size", "4", "--out", "<routes>", "--no-progress"],
    "attack": ["attack", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--method", "fgsm",
               "--out", "<adv>"],
    "detect": ["detect", "--train-real", "<routes>", "--train-adv", "<routes>", "--test-real", "<routes>",
               "--test-adv", "<routes>", "--sizes", "1", "--runs", "1", "--classifiers", "random_forest"],
    "quickstart": ["quickstart", "--out", "<quick>", "--epochs", "1", "--no-progress"],
    "explain": ["explain", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--method", "gradient",
                "--batch-size", "4", "--out", "<explained>", "--no-progress"],
    # an RGB image folder of 6 images (3 per class), the generated textures and colours
    "concepts": ["concepts", "--data", "<images>", "--split", "test", "--out", "<concepts_new>", "--color-table",
                 "<color_table>", "--textures-per-name", "1"],
    # a randomly initialised resnet20: the concept set is RGB 32x32
    "dissect": ["dissect", "--model", "resnet20", "--weights", "<r20_ckpt>", "--concepts", "<concepts>", "--layer",
                "layer1.0", "--batch-size", "8", "--out", "<dissected>"],
    "subnet": ["subnet", "--model", "digits_cnn", "--weights", "<ckpt>", "--data", "digits", "--limit", "20",
               "--epochs", "1", "--batch-size", "8", "--out", "<subnets>"],
    "data convert": ["data", "convert", "--data", "<images>", "--split", "test", "--model", "digits_cnn", "--out",
                     "<records_new>", "--decode-workers", "0", "--no-progress"],
    "decouple": ["decouple", "--model", "digits_cnn", "--weights", "<ckpt>", "--data", "digits", "--limit", "16",
                 "--out", "<decoupled_new>", "--epochs", "1", "--batch-size", "8", "--no-augment"],
    # --train-split '' leaves out the Gaussian detector (a second pass over the training split)
    "probe": ["probe", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--wordnet", "<wordnet>",
              "--adv", "<targeted>/test.npz", "--train-split", "", "--top-frac", "0.5", "--out", "<probed>"],
    "adv-train": ["adv-train", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--epochs", "1",
                  "--batch-size", "8", "--steps", "1", "--out", "<adv_trained_new>"],
    "trace": ["trace", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "8", "--wordnet", "<wordnet>",
              "--point", "conv3", "--top", "1", "--batch-size", "8", "--out", "<traced>"],
    "localize": ["localize", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "16", "--methods", "gradient",
                 "--n-train", "2", "--n-test", "2", "--batch-size", "2"],
    # the protocol needs 40 selected images: DeepFool on 150 (the valid run is in the slow test)
    "adv-detect": ["adv-detect", "--model", "digits_cnn", "--weights", "<ckpt>", "--limit", "150", "--train-limit",
                   "500", "--attacks", "deepfool", "--detectors", "mahalanobis", "--eps", "0", "--out",
                   "<adv_detected_new>"],
}
# Subcommands whose bad values this file does not cover (none); listed so that the coverage test names
# every other one.
NOT_COVERED: set[str] = set()
# Valid runs left to the slow test: quickstart trains and routes the whole digits test set; train,
# subnet, decouple and adv-train compile training steps (the fixture's previous "train" output is the
# trained digits CNN); dissect compiles resnet20; adv-detect attacks 150 images.
HEAVY_VALID = {"quickstart", "train", "dissect", "subnet", "decouple", "adv-train", "adv-detect"}

INPUT_PATHS = {"weights", "data", "train_real", "train_adv", "test_real", "test_adv", "color_table", "concepts",
               "adv", "wordnet"}
OUTPUT_PATHS = {"out"}
# Options whose value no bad-value class applies to, and why.
EXEMPT = {
    "data_dir": "a cache folder: an unwritable one is a warning by design (the data still loads); "
                "digits and .npz data do not use it",
}
# Options a negative value is valid for, and why.
NEGATIVE_OK = {
    ("trace", "threshold"): "a prediction difference is signed (removing a channel can raise the class's probability)",
}
# Free-text options: their malformed values.
STRING_CASES: dict[str, list[str]] = {
    "model": ["nope", ""],
    "split": ["nope", ""],
    "memory_budget": ["lots", "-1GB", "nanGB", "infGB", "0"],
    "coordinator": ["nohost", "127.0.0.1:port", ""],
    "sizes": ["a,b", "10,-1", "0", "nan", ""],
    "classifiers": ["nope", ""],
    "feature": ["nope", ""],
    "method": ["nope", "gradient,gradient", ""],   # explain: a comma-separated list of saliency methods
    "subnets": ["<missing>", "<a_file>"],          # explain, localize: a subnet output folder
    "methods": ["nope", "gradient,gradient", ""],  # localize: a comma-separated list of saliency methods
    "train_split": ["nope", ""],                   # localize: the split the alpha* canvases come from
    "ensemble": ["nope", "digits_cnn:<missing>", "resnet20:<ckpt>", "digits_cnn:<random_th>"],  # NAME:WEIGHTS
    "layer": ["nope", ""],
    "point": ["nope", ""],
    "test_split": ["nope", ""],
    "milestones": ["a,b", "0.5,nan", "-0.5", "1.5", "0.75,0.5"],  # decouple; "" is valid: no lr drops
    "coral_norm": ["nope", ""],                    # adv-train: l1 | fro2
    "mmd": ["nope", ""],                           # adv-train: linear | gaussian
}
# Per-subcommand malformed values where one value is valid for that subcommand only.
COMMAND_STRING_CASES: dict[tuple[str, str], list[str]] = {
    ("probe", "train_split"): ["nope"],           # '' leaves out the Gaussian detector
    ("adv-detect", "eps"): ["a", "0,nan", "-0.1", "inf", ""],   # Mahalanobis noise magnitudes
    ("adv-detect", "lid_k"): ["a", "0", "1.5", ""],
    ("adv-detect", "attacks"): ["nope", "fgsm,nope", ""],
    ("adv-detect", "detectors"): ["nope", ""],
    ("adv-detect", "cdrp_classifier"): ["nope", "logistic,adaboost", ""],
}
# Arguments a value needs to be read at all (e.g. --prune-frac belongs to awr/aar).
CONTEXT: dict[tuple[str, str], list[str]] = {
    ("route", "prune_frac"): ["--method", "awr"],
    ("route", "coordinator"): ["--num-processes", "2", "--process-id", "1", "--init-timeout", "1"],
    ("route", "num_processes"): ["--coordinator", "127.0.0.1:1", "--process-id", "0"],
    ("route", "process_id"): ["--coordinator", "127.0.0.1:1", "--num-processes", "2"],
    ("attack", "steps"): ["--method", "ifgsm"],
    ("attack", "alpha"): ["--method", "pgd_linf"],
    ("attack", "lam"): ["--method", "ensemble"],
    ("attack", "ensemble"): ["--method", "ensemble"],
    ("dissect", "eps"): ["--attack", "fgsm"],
    ("probe", "train_limit"): ["--train-split", "train"],
    ("adv-detect", "lid_k"): ["--detectors", "lid"],
    ("adv-detect", "bandwidth"): ["--detectors", "kd_pu"],
    ("adv-detect", "pu_passes"): ["--detectors", "kd_pu"],
    ("adv-detect", "subnets"): ["--detectors", "subnet"],
}
# Finished outputs of the valid runs: byte-identical after every failing case.
FINISHED = ("routes", "adv", "trained", "converted", "routes_bad_shard", "routes_bad_manifest", "explained",
            "concepts", "targeted", "probed", "traced", "r20_ckpt")


def subcommands(parser=None, prefix="") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand ("route", "data convert", ...) and its parser."""
    out = {}
    for a in (parser or build_parser())._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                out.update(subcommands(p, f"{prefix}{name} ") or {f"{prefix}{name}": p})
    return out


def value_options(parser: argparse.ArgumentParser):
    """The options of a subcommand that take a value (flags and --help have nothing to fuzz)."""
    for a in parser._actions:
        if a.option_strings and a.nargs != 0:
            yield a


def option_cases(cmd: str, a: argparse.Action) -> list[tuple[str, list[str]]]:
    """(class, extra argv) for one option."""
    opt, dest = a.option_strings[-1], a.dest
    ctx = CONTEXT.get((cmd, dest), [])
    cases = []
    if dest in EXEMPT:
        return []
    if a.choices is not None:
        cases.append(("wrong-type", [opt, "nope"]))
    elif dest in INPUT_PATHS:
        cases += [("missing-path", [opt, "<missing>"]), ("missing-path", [opt, "<a_file>"])]
    elif dest in OUTPUT_PATHS:
        cases += [("unwritable-path", [opt, "<under_file>"]), ("unwritable-path", [opt, "<a_file>"])]
        if not IS_ROOT:
            cases.append(("unwritable-path", [opt, "<ro_dir>/sub"]))
    elif a.type is int:
        cases += [("wrong-type", [opt, v]) for v in ("abc", "1.5", "nan")] + [("negative", [opt, "-1"])]
    elif a.type is float:
        cases += [("wrong-type", [opt, "abc"])] + [("non-finite", [opt, v]) for v in ("nan", "inf", "-inf")]
        if (cmd, dest) not in NEGATIVE_OK:
            cases.append(("negative", [opt, "-1"]))
    elif (cmd, dest) in COMMAND_STRING_CASES or dest in STRING_CASES:
        cases += [("malformed", [opt, v]) for v in COMMAND_STRING_CASES.get((cmd, dest), STRING_CASES.get(dest))]
    else:
        return [("UNCLASSIFIED", [opt])]
    return [(c, ctx + extra) for c, extra in cases]


def all_cases() -> list:
    out = []
    for cmd, parser in subcommands().items():
        if cmd in NOT_COVERED:
            continue
        opts = {a.dest: a for a in value_options(parser)}
        for a in opts.values():
            out += [(cmd, c, extra) for c, extra in option_cases(cmd, a)]
        if "weights" in opts and "model" in opts:
            out += [(cmd, "wrong-pairing", ["--model", "resnet20", "--weights", "<ckpt>"]),
                    (cmd, "wrong-pairing", ["--model", "resnet20", "--weights", "<torch_file>"]),
                    (cmd, "wrong-pairing", ["--model", "digits_cnn", "--weights", "<other_torch_file>"]),
                    (cmd, "corrupt-file", ["--weights", "<random_th>"]),
                    (cmd, "corrupt-file", ["--weights", "<ckpt_bad_meta>"]),
                    (cmd, "corrupt-file", ["--weights", "<ckpt_bad_vars>"])]
        if "data" in opts:
            out.append((cmd, "corrupt-file", ["--data", "<bad_npz_dir>"]))
        for d in ("train_real", "train_adv", "test_real", "test_adv"):
            if d in opts:
                opt = opts[d].option_strings[-1]
                out += [(cmd, "corrupt-file", [opt, "<routes_bad_shard>"]),
                        (cmd, "corrupt-file", [opt, "<routes_bad_manifest>"])]
        for d, bad in (("color_table", "<bad_color_table>"), ("concepts", "<concepts_bad_csv>"), ("adv", "<bad_adv>"),
                       ("wordnet", "<bad_wordnet>")):
            if d in opts:
                out.append((cmd, "corrupt-file", [opts[d].option_strings[-1], bad]))
        if cmd == "route":  # a damaged previous output in --out is refused, not trusted or overwritten
            out += [(cmd, "corrupt-file", ["--out", "<routes_bad_shard>"]),
                    (cmd, "corrupt-file", ["--out", "<routes_bad_manifest>"])]
    return out


CASES = all_cases()


def case_id(case) -> str:
    cmd, cls, extra = case
    return f"{cmd}-{cls}-" + "_".join(e.strip("-<>") or "EMPTY" for e in extra)


def resolve(argv, ctx) -> list[str]:
    return [re.sub(r"<(\w+)>", lambda m: str(ctx[m.group(1)]), a) for a in argv]


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def check_one_line_error(code: int, err: str, cmd: str) -> None:
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    if lines[0].startswith("usage:"):  # argparse's own format: usage lines, then one error line
        errors = [l for l in lines if ": error: " in l]
        assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("jaxroute"), err
    else:
        assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
        assert lines[0].startswith(f"jaxroute {cmd.split()[0]}") and ": error: " in lines[0], err


def snapshot(ctx) -> dict[str, str]:
    digests = {}
    for name in FINISHED:
        for f in sorted(Path(ctx[name]).rglob("*")):
            if f.is_file():
                digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def torch_state_dict(variables) -> dict:
    """A PyTorch state dict of flat-named variables (the inverse of ``torch_to_flax`` for
    models whose module names have no numeric parts, such as the digits CNN)."""
    import torch
    from flax.traverse_util import flatten_dict

    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    sd = {}
    for (coll, *path, name), v in flatten_dict(dict(variables)).items():
        v = np.asarray(v)
        if name == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        sd[".".join(path) + "." + leaf[name]] = torch.from_numpy(np.ascontiguousarray(v))
    return sd


@pytest.fixture(scope="module")
def ctx(digits_ckpt, tmp_path_factory):
    """Finished outputs of every subcommand's valid run, and the bad files the cases use."""
    torch = pytest.importorskip("torch")
    from jaxroute.data import load_dataset
    from jaxroute.weights import load_model

    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    c = {"ckpt": digits_ckpt, "missing": root / "missing" / "thing", "a_file": root / "a_file",
         "under_file": root / "a_file" / "sub", "ro_dir": root / "ro_dir", "quick": root / "quick"}
    c["a_file"].write_text("a regular file\n")
    c["ro_dir"].mkdir()
    c["ro_dir"].chmod(0o555)
    c["random_th"] = root / "random.th"
    c["random_th"].write_bytes(rng.bytes(4096))
    c["torch_file"] = root / "digits_cnn.th"
    torch.save(torch_state_dict(load_model(None, digits_ckpt).variables), c["torch_file"])
    c["other_torch_file"] = root / "other.th"
    torch.save({"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}, c["other_torch_file"])
    # a jaxroute checkpoint with garbled metadata, and one with garbled variables
    c["ckpt_bad_meta"] = root / "ckpt_bad_meta"
    shutil.copytree(digits_ckpt, c["ckpt_bad_meta"])
    (c["ckpt_bad_meta"] / "jaxroute.json").write_text('{"arch": "digits_cnn", ')
    c["ckpt_bad_vars"] = root / "ckpt_bad_vars"
    shutil.copytree(digits_ckpt, c["ckpt_bad_vars"])
    for f in (c["ckpt_bad_vars"] / "variables").rglob("*"):
        if f.is_file():
            f.write_bytes(rng.bytes(max(16, f.stat().st_size)))
    # a folder of SPLIT.npz arrays, each cut in half
    c["bad_npz_dir"] = root / "bad_npz"
    c["bad_npz_dir"].mkdir()
    for split in ("train", "test"):
        ds = load_dataset("digits", split, limit=16)
        good = root / f"good-{split}.npz"
        np.savez(good, images=ds.images, labels=ds.labels)
        data = good.read_bytes()
        (c["bad_npz_dir"] / f"{split}.npz").write_bytes(data[: len(data) // 2])

    # the previous runs whose outputs every failing case must leave alone
    for name in ("routes", "adv", "trained", "converted", "explained"):
        c[name] = root / name
    shutil.copytree(digits_ckpt, c["trained"])
    for cmd in ("convert", "route", "attack", "explain"):
        assert main(resolve(VALID[cmd], c)) == 0, cmd
    assert len(list(c["routes"].glob("shard-*.npz"))) >= 1
    c["routes_bad_shard"] = root / "routes_bad_shard"
    shutil.copytree(c["routes"], c["routes_bad_shard"])
    shard = c["routes_bad_shard"] / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:200])
    c["routes_bad_manifest"] = root / "routes_bad_manifest"
    shutil.copytree(c["routes"], c["routes_bad_manifest"])
    (c["routes_bad_manifest"] / "manifest.json").write_text('{"format": ')
    # inputs of the concept, dissection, probe and trace commands, and damaged copies of them
    from PIL import Image

    import jax
    from jaxroute.weights import save_model

    for k in ("concepts_new", "records_new", "decoupled_new", "adv_trained_new", "adv_detected_new", "dissected", "subnets", "probed",
              "traced"):
        c[k] = root / k
    for cls in ("cat", "dog"):
        d = root / "images" / "test" / cls
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    c["images"] = root / "images"
    c["color_table"] = root / "w2color.npy"
    np.save(c["color_table"], rng.integers(0, 11, (32, 32, 32)).astype(np.uint8))
    c["concepts"] = root / "concepts"
    assert main(resolve(VALID["concepts"], c) + ["--out", str(c["concepts"])]) == 0
    # random resnet20 weights drawn in numpy on the abstract variables: jitting its init costs ~10 CPU s
    from jaxroute.models.meta import default_meta
    from jaxroute.models.registry import create_model
    from jaxroute.weights.loader import abstract_variables

    c["r20_ckpt"] = root / "r20"
    meta = default_meta("resnet20", source="random-init")
    shapes = abstract_variables(create_model("resnet20", **meta.module_overrides()), meta.input_shape)
    save_model(c["r20_ckpt"], jax.tree_util.tree_map_with_path(
        lambda p, a: np.ones(a.shape, a.dtype) if "var" in jax.tree_util.keystr(p)    # BN running variances
        else rng.normal(0, 0.1, a.shape).astype(a.dtype), shapes), meta)
    c["wordnet"] = root / "wordnet"
    c["wordnet"].mkdir()
    wnid = {str(i): f"n{i:08d}" for i in range(10)}
    (c["wordnet"] / "cifar10_wnids.tsv").write_text(
        "\n".join(["label\tclass\twnid\tsynset_words"] + [f"{i}\t{i}\t{wnid[str(i)]}\tdigit {i}" for i in range(10)]))
    (c["wordnet"] / "wordnet.is_a.txt").write_text("\n".join(
        ["n00000100 n00000101", "n00000100 n00000102"] + [f"n0000010{1 + i % 2} {wnid[str(i)]}" for i in range(10)]))
    (c["wordnet"] / "words.txt").write_text("\n".join([f"{w}\tdigit {k}" for k, w in wnid.items()]
                                                      + ["n00000100\tnumber", "n00000101\teven", "n00000102\todd"]))
    c["targeted"] = root / "targeted"
    assert main(["attack", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--limit", "8", "--method", "ifgsm",
                 "--target", "least_likely", "--steps", "2", "--out", str(c["targeted"])]) == 0
    for cmd in ("probe", "trace"):
        assert main(resolve(VALID[cmd], c)) == 0, cmd
    c["bad_color_table"] = root / "bad_w2color.npy"
    c["bad_color_table"].write_bytes(c["color_table"].read_bytes()[:300])
    c["concepts_bad_csv"] = root / "concepts_bad_csv"
    shutil.copytree(c["concepts"], c["concepts_bad_csv"])
    (c["concepts_bad_csv"] / "label.csv").write_bytes(rng.bytes(300))
    c["bad_adv"] = root / "bad_adv.npz"
    data = (c["targeted"] / "test.npz").read_bytes()
    c["bad_adv"].write_bytes(data[: len(data) // 2])
    c["bad_wordnet"] = root / "bad_wordnet"
    shutil.copytree(c["wordnet"], c["bad_wordnet"])
    (c["bad_wordnet"] / "wordnet.is_a.txt").write_bytes(rng.bytes(300))
    (c["bad_wordnet"] / "cifar10_wnids.tsv").write_text("label\tclass\n0\n")
    c["snapshot"] = snapshot(c)
    c["pristine"] = root / "pristine"
    for name in FINISHED:
        shutil.copytree(c[name], c["pristine"] / name)
    yield c
    c["ro_dir"].chmod(0o755)


def test_every_subcommand_has_minimal_valid_arguments():
    """A new subcommand is fuzzed once it has an entry in VALID; its free-text options need STRING_CASES."""
    cmds = subcommands()
    assert sorted(set(cmds) - NOT_COVERED) == sorted(VALID), "add the new subcommand's minimal valid arguments to VALID"
    unclassified = [(cmd, extra[0]) for cmd, cls, extra in CASES if cls == "UNCLASSIFIED"]
    assert not unclassified, f"classify these options (STRING_CASES, INPUT_PATHS, OUTPUT_PATHS): {unclassified}"
    for cmd, parser in cmds.items():
        assert cmd in NOT_COVERED or any(c[0] == cmd for c in CASES) or not list(value_options(parser)), cmd


@pytest.mark.parametrize("cmd", sorted(set(VALID) - HEAVY_VALID - {"convert", "route", "attack", "explain", "probe",
                                                                    "trace"}))
def test_minimal_arguments_are_valid(cmd, ctx, tmp_path):
    """The baseline of the cases runs (so each case fails because of its one bad value);
    convert, route, attack, explain, probe and trace ran in the ``ctx`` fixture."""
    assert main(resolve(VALID[cmd], ctx) + (["--out", str(tmp_path / "out")] if "--out" in VALID[cmd] else [])) == 0
    assert ctx["snapshot"] == snapshot(ctx)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", sorted(HEAVY_VALID))
def test_heavy_minimal_arguments_are_valid(cmd, ctx, tmp_path):
    assert main(resolve(VALID[cmd], ctx) + ["--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "UNCLASSIFIED"], ids=case_id)
def test_bad_value_is_a_one_line_error(case, ctx, capsys, monkeypatch):
    monkeypatch.delenv("JAXROUTE_DEBUG", raising=False)
    cmd, cls, extra = case
    code, err = run_cli(resolve(VALID[cmd] + extra, ctx), capsys)
    changed = ctx["snapshot"] != snapshot(ctx)
    if changed:  # put the outputs back, so that one failure does not fail every later case
        for name in FINISHED:
            shutil.rmtree(ctx[name])
            shutil.copytree(ctx["pristine"] / name, ctx[name])
    check_one_line_error(code, err, cmd)
    assert not changed, "a failing run changed a finished output"


@pytest.mark.slow
def test_quickstart_valid_run_then_bad_values_leave_it_alone(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["quickstart", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    c = {"quick": out, "routes": out / "routes", "adv": tmp_path / "none", "trained": out / "digits_cnn",
         "converted": tmp_path / "none", "routes_bad_shard": tmp_path / "none", "routes_bad_manifest": tmp_path / "none"}
    before = snapshot(c)
    for bad in (["--epochs", "-1"], ["--epochs", "0"]):
        code, err = run_cli(["quickstart", "--out", str(out), "--no-progress", *bad], capsys)
        check_one_line_error(code, err, "quickstart")
    assert snapshot(c) == before


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_without_workers_is_a_one_line_error(tmp_path):
    """Process 0 of a --coordinator job whose other processes never come ends with one line after
    --init-timeout, not with an abort inside the runtime."""
    addr = f"127.0.0.1:{_free_port()}"
    out = subprocess.run([sys.executable, "-m", "jaxroute.cli.main", "route", "--model", "digits_cnn",
                          "--data", "digits", "--limit", "8", "--out", str(tmp_path / "r"), "--coordinator", addr,
                          "--num-processes", "2", "--process-id", "0", "--init-timeout", "3", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxroute route: error:") and addr in last and "within 3 s" in last, out.stderr
    for bad in ("Traceback", "Check failure", "*** ", "SIGABRT", "Aborted"):
        assert bad not in out.stderr, out.stderr
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_rendezvous_releases_everyone_or_names_who_is_missing():
    """The socket rendezvous before jax.distributed: all processes meet, or each side ends with one line."""
    import threading

    from jaxroute.utils import rendezvous

    addr = f"127.0.0.1:{_free_port()}"
    errors = []

    def worker(pid, n=3, timeout=20):
        try:
            rendezvous.join(addr, pid, n, timeout, log=lambda m: None)
        except ValueError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(pid,)) for pid in (1, 2)]
    for t in threads:  # the workers come first and wait for process 0
        t.start()
    rendezvous.gather(addr, 3, 20, log=lambda m: None)
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)

    addr = f"127.0.0.1:{_free_port()}"
    t = threading.Thread(target=worker, args=(1, 2, 5))   # says 2 processes; process 0 runs 3
    t.start()
    with pytest.raises(ValueError, match=r"within 2 s: processes 1, 2 of 3 never connected"):
        rendezvous.gather(addr, 3, 2, log=lambda m: None)
    t.join(30)
    assert len(errors) == 1 and "refused this process" in errors[0] and "process 1 of 2" in errors[0]
    with pytest.raises(ValueError, match="did not answer within 1 s"):
        rendezvous.join(f"127.0.0.1:{_free_port()}", 1, 2, 1, log=lambda m: None)
