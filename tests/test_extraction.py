"""The generic extraction job as a library: batch plans, memory sizes, shards, manifest, resume,
refusals, processes and devices, with a per-sample function that is not a router."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_devices import run_with_cpu_devices

from jaxroute.data import Dataset, load_dataset
from jaxroute.utils import conv_grads
from jaxroute.extraction import (
    BatchPlan, ExtractionResult, load_manifest, load_shards, parse_bytes, plan_batches, run_extraction, shard_path,
)

N = 100            # digits test images used
BATCH, SHARD = 8, 16


# ---------------------------------------------------------------- plans and sizes

def test_plan_batches_rules():
    p = plan_batches(1000, 32, 100, devices=1)
    assert p == BatchPlan(32, 1, 128) and p.global_batch == 32       # shard rounded up to a multiple of 32
    assert p.num_shards(1000) == 8 and p.num_shards(1024) == 8 and p.num_shards(1025) == 9
    p = plan_batches(1000, 8, 20, devices=2)
    assert p == BatchPlan(8, 2, 32) and p.global_batch == 16        # the batch is per device
    assert plan_batches(1000, 8, 32, devices=2).shard_size == 32    # already a multiple: kept
    # a data set smaller than one global batch runs at the per-device batch it fills
    assert plan_batches(10, 32, 1024, devices=1) == BatchPlan(10, 1, 1030)
    assert plan_batches(10, 32, 1024, devices=4) == BatchPlan(3, 4, 1032)
    assert plan_batches(1, 32, 5, devices=1) == BatchPlan(1, 1, 5)
    # devices default to the local device count
    assert plan_batches(1000, 4, 8).devices == jax.local_device_count()


@pytest.mark.parametrize("kwargs, needle", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": 2.0}, "batch_size must be an integer >= 1"),
    ({"batch_size": True}, "batch_size must be an integer >= 1"),
    ({"shard_size": 0}, "shard_size must be an integer >= 1"),
    ({"devices": 0}, "devices must be an integer >= 1"),
    ({"n": 0}, "nothing to do"),
])
def test_plan_batches_errors(kwargs, needle):
    args = {"n": 100, "batch_size": 8, "shard_size": 16, "devices": 1, **kwargs}
    with pytest.raises(ValueError, match=needle):
        plan_batches(**args)


@pytest.mark.parametrize("text, value", [
    ("512MB", 512 * 2**20), ("512mb", 512 * 2**20), ("2G", 2 * 2**30), ("2GB", 2 * 2**30),
    ("1.5GiB", int(1.5 * 2**30)), ("64K", 64 * 2**10), ("1T", 2**40), ("1000000", 1000000), (" 4MB ", 4 * 2**20),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "", "MB", "0", "-1MB", "0.5", "inf", "nan", "1.5XB"])
def test_parse_bytes_errors(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


# ---------------------------------------------------------------- a non-routing per-sample function

def pooled_features_fn(model):
    """Per-sample mean activation at every gate point, penultimate features and prediction; echoes
    the labels and indices the job passes in."""

    @jax.jit
    def fn(images, labels, index):
        cap = model.capture(images)
        out = {f"pooled_{n}": jnp.mean(a, axis=(1, 2)) for n, a in cap.acts.items()}
        return {**out, "features": cap.features, "pred": jnp.argmax(cap.logits, -1), "label_seen": labels,
                "index_seen": index}

    return fn


def digits_part(n=N) -> Dataset:
    return load_dataset("digits", "test", limit=n)


def random_digits_model():
    from jaxroute.weights import load_model

    return load_model("digits_cnn", key=jax.random.key(0))


JOB = {"model": "digits_cnn", "weights": "random-init key 0", "data": "digits", "split": "test", "what": "pooled"}


def extract(out, fn=None, *, ds=None, job=JOB, plan=None, extra=None, **kw) -> ExtractionResult:
    ds = digits_part() if ds is None else ds
    plan = plan_batches(len(ds.images), BATCH, SHARD) if plan is None else plan
    fn = pooled_features_fn(random_digits_model()) if fn is None else fn
    return run_extraction(fn, ds, out, job=job, plan=plan, extra=extra or {"layers": 3}, progress=False, **kw)


def run_in_subprocess(out: Path, devices: int) -> str:
    """The same extraction in a fresh process with ``devices`` CPU devices; returns its stderr."""
    return run_with_cpu_devices(devices, "test_extraction", "t.extract(argv[0])", out)


@pytest.fixture(scope="module")
def model():
    return random_digits_model()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "pooled"
    res = extract(out, pooled_features_fn(model))
    return out, res


def assert_same(a, b):
    sa, sb = load_shards(a), load_shards(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_generic_job_writes_shards_and_manifest(model, reference):
    out, res = reference
    ds = digits_part()
    plan = plan_batches(N, BATCH, SHARD)
    assert isinstance(res, ExtractionResult) and res.out == out and res.computed == N
    assert res.samples_per_s is None or res.samples_per_s > 0
    m = load_manifest(out)
    assert m == res.manifest
    assert m["job"] == JOB and m["extra"] == {"layers": 3} and m["num_samples"] == N
    assert m["plan"] == {"batch_size": plan.batch_size, "shard_size": plan.shard_size,
                         "conv_formulation": conv_grads.formulation()}
    assert m["devices"] == plan.devices                             # recorded, not compared on resume
    assert m["num_shards"] == plan.num_shards(N) and m["class_names"] == list(ds.class_names)
    shards = sorted(out.glob("shard-*.npz"))
    assert [p.name for p in shards] == [shard_path(out, i).name for i in range(m["num_shards"])]
    with np.load(shards[1]) as z:                                   # plain numpy, no jaxroute needed
        assert set(z.files) == {"index", "label", "input_crc32", "features", "pred", "label_seen", "index_seen",
                                *(f"pooled_{n}" for n in model.spec.names)}
        np.testing.assert_array_equal(z["index"], np.arange(plan.shard_size, 2 * plan.shard_size))
    s = load_shards(out)
    assert "input_crc32" not in s                                   # per shard, not per sample
    np.testing.assert_array_equal(s["index"], np.arange(N))
    np.testing.assert_array_equal(s["label"], ds.labels)
    np.testing.assert_array_equal(s["label_seen"], ds.labels)       # fn saw each sample's own label and index,
    np.testing.assert_array_equal(s["index_seen"], np.arange(N))    # padding rows dropped
    cap = model.capture(ds.images)
    np.testing.assert_allclose(s["features"], np.asarray(cap.features), rtol=1e-5, atol=1e-6)
    for n, c in model.spec:
        assert s[f"pooled_{n}"].shape == (N, c)
        np.testing.assert_allclose(s[f"pooled_{n}"], np.asarray(cap.acts[n]).mean(axis=(1, 2)), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_array_equal(s["pred"], np.asarray(cap.logits).argmax(-1))


def test_finished_job_rerun_computes_nothing(model, reference, tmp_path):
    out, _ = reference
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    res = extract(out, pooled_features_fn(model))
    assert res.computed == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")} == before


class Interrupted(Exception):
    pass


def interrupt_after(fn, batches: int):
    """``fn`` that dies when asked for batch ``batches + 1`` (a job killed part-way)."""
    calls = [0]

    def f(*args):
        calls[0] += 1
        if calls[0] > batches:
            raise Interrupted(f"killed at batch {calls[0]}")
        return fn(*args)

    return f


def test_interrupted_job_resumes_to_the_uninterrupted_output(model, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "pooled"
    fn = pooled_features_fn(model)
    plan = plan_batches(N, BATCH, SHARD)
    per_shard = plan.shard_size // plan.global_batch
    with pytest.raises(Interrupted):
        extract(out, interrupt_after(fn, 2 * per_shard + 1), plan=plan)
    done = sorted(p.name for p in out.glob("shard-*.npz"))
    assert done == [shard_path(out, 0).name, shard_path(out, 1).name]     # complete shards only
    assert not list(out.glob(".*.tmp"))                                  # no half-written file
    res = extract(out, fn, plan=plan)
    assert res.computed == N - 2 * plan.shard_size
    assert_same(out, ref)
    # a lost shard is recomputed alone, bit-identical
    shard_path(out, 3).unlink()
    res = extract(out, fn, plan=plan)
    assert res.computed == plan.shard_size
    assert_same(out, ref)
    with np.load(shard_path(out, 3)) as a, np.load(shard_path(ref, 3)) as b:
        assert int(a["input_crc32"]) == int(b["input_crc32"])


def test_resume_with_other_arguments_is_refused(model, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "pooled"
    fn = pooled_features_fn(model)
    with pytest.raises(Interrupted):
        extract(out, interrupt_after(fn, 3))
    shards = sorted(p.name for p in out.glob("shard-*.npz"))
    manifest = (out / "manifest.json").read_text()
    cases = [
        (dict(job={**JOB, "what": "saliency"}), "job.what: output has 'pooled', this run 'saliency'"),
        (dict(job={**JOB, "weights": "other"}), "job.weights: output has 'random-init key 0', this run 'other'"),
        (dict(plan=plan_batches(N, BATCH // 2, SHARD)), f"plan.batch_size: output has {BATCH}, this run {BATCH // 2}"),
        (dict(plan=plan_batches(N, BATCH, 4 * SHARD)), "plan.shard_size"),
        (dict(extra={"layers": 4}), "extra.layers: output has 3, this run 4"),
        (dict(ds=digits_part(N - 10)), f"num_samples: output has {N}, this run {N - 10}"),
    ]
    for kw, needle in cases:
        with pytest.raises(ValueError, match="another job") as e:
            extract(out, fn, **kw)
        assert needle in str(e.value), str(e.value)
    # nothing was mixed in, and the same arguments still resume
    assert sorted(p.name for p in out.glob("shard-*.npz")) == shards
    assert (out / "manifest.json").read_text() == manifest
    extract(out, fn)
    assert_same(out, ref)


def test_resume_on_changed_images_is_refused(model, tmp_path):
    out = tmp_path / "pooled"
    fn = pooled_features_fn(model)
    ds = digits_part()
    with pytest.raises(Interrupted):
        extract(out, interrupt_after(fn, 3), ds=ds)
    changed = ds.images.copy()
    changed[3, 0, 0, 0] = 1.0 - changed[3, 0, 0, 0]                 # one pixel of a finished shard's image
    with pytest.raises(ValueError, match="input images changed since shard-00000.npz was written"):
        extract(out, fn, ds=Dataset(changed, ds.labels, ds.class_names, ds.name))
    extract(out, fn, ds=ds)                                          # the original images resume


def test_bad_per_sample_outputs_and_plans(model, tmp_path):
    fn = pooled_features_fn(model)

    def with_index(images, labels, index):
        return {"index": index, "x": images.sum(axis=(1, 2, 3))}

    with pytest.raises(ValueError, match="returned 'index', which the job writes itself"):
        extract(tmp_path / "a", jax.jit(with_index))
    assert not list((tmp_path / "a").glob("shard-*.npz"))
    other = jax.local_device_count() + 1
    with pytest.raises(ValueError, match=f"the batch plan is for {other} devices"):
        extract(tmp_path / "b", fn, plan=plan_batches(N, BATCH, SHARD, devices=other))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shards"):
        load_shards(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt manifest"):
        load_manifest(tmp_path)


def test_processes_share_the_shards(model, reference, tmp_path):
    """Each process takes the shards i % count == index; together they write the whole output."""
    ref, _ = reference
    out = tmp_path / "pooled"
    fn = pooled_features_fn(model)
    plan = plan_batches(N, BATCH, SHARD)
    n_shards = plan.num_shards(N)
    # two processes, one after the other; process 0 writes the manifest
    res0 = extract(out, fn, plan=plan, process_index=0, process_count=2)
    assert sorted(p.name for p in out.glob("shard-*.npz")) == [shard_path(out, i).name for i in range(0, n_shards, 2)]
    assert load_manifest(out) == res0.manifest
    res1 = extract(out, fn, plan=plan, process_index=1, process_count=2)
    assert res0.computed + res1.computed == N
    assert len(list(out.glob("shard-*.npz"))) == n_shards
    assert_same(out, ref)


def test_devices_give_bit_identical_outputs(reference, tmp_path):
    """The per-device batch is the compiled shape: 1 and 2 devices compute the same bits."""
    ref, _ = reference
    local = jax.local_device_count()
    other = 2 if local == 1 else 1
    out = tmp_path / f"dev{other}"
    run_in_subprocess(out, other)
    assert load_manifest(out)["devices"] == other
    assert load_manifest(ref)["devices"] == local
    assert_same(out, ref)


def test_resume_on_another_device_count(model, reference, tmp_path, monkeypatch):
    """The device count is not part of the output: a job interrupted here resumes with another
    count (same per-device batch, shard size and conv formulation) to the uninterrupted output."""
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", conv_grads.formulation())  # the subprocess inherits it
    ref, _ = reference
    out = tmp_path / "pooled"
    with pytest.raises(Interrupted):
        extract(out, interrupt_after(pooled_features_fn(model), 3))
    n_done = len(list(out.glob("shard-*.npz")))
    assert n_done >= 1
    other = 2 if jax.local_device_count() == 1 else 1
    assert plan_batches(N, BATCH, SHARD, devices=other).shard_size == plan_batches(N, BATCH, SHARD).shard_size
    run_in_subprocess(out, other)
    assert load_manifest(out)["devices"] == jax.local_device_count()   # the manifest of the first run
    assert_same(out, ref)


def test_resume_with_another_conv_formulation_is_refused(model, tmp_path, monkeypatch):
    """Column-paired and canonical convs round differently: a resume never mixes them."""
    out = tmp_path / "pooled"
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "canonical")
    with pytest.raises(Interrupted):
        extract(out, interrupt_after(pooled_features_fn(model), 1))
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "paired")
    with pytest.raises(ValueError, match=r"plan.conv_formulation: output has 'canonical', this run 'paired'"):
        extract(out, pooled_features_fn(model))
