"""The shared argument checks (one rule and one message, Python ints and floats out) and the stage timings."""
import json

import numpy as np
import pytest

from jaxroute.utils.checks import check_finite, check_int


def test_check_int_accepts_integers_and_returns_python_ints():
    assert check_int(3, "n") == 3 and type(check_int(np.int64(3), "n")) is int
    assert check_int(0, "seed", 0) == 0 and check_int(None, "limit", allow_none=True) is None
    with pytest.raises(ValueError, match=r"^limit must be an integer >= 1 or None, got 0"):
        check_int(0, "limit", allow_none=True)
    with pytest.raises(ValueError, match="must be an integer >= 1, got None"):
        check_int(None, "n")
    for bad in (0, -1, 2.0, True, "3", None, np.float32(3)):
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got "):
            check_int(bad, "n")


def test_check_finite_rejects_bool_nan_inf_and_text():
    assert check_finite(0.5, "lr") == 0.5 and type(check_finite(np.float32(0.5), "lr")) is float
    for bad in (float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match=r"^lr must be a finite number, got "):
            check_finite(bad, "lr")


def test_configs_keep_python_ints_for_their_manifests():
    import dataclasses

    from jaxroute.routing.dgr import DGRConfig
    from jaxroute.routing.subnet import SubnetConfig
    from jaxroute.training.train import TrainConfig

    for cfg in (DGRConfig(steps=np.int64(5)), SubnetConfig(epochs=np.int64(2), seed=np.int64(1)),
                TrainConfig(epochs=np.int64(2), batch_size=np.int64(8), seed=np.int64(0))):
        json.dumps(dataclasses.asdict(cfg))   # NumPy integers would not serialise


def test_library_entry_points_use_the_shared_message():
    from jaxroute.data.core import batches
    from jaxroute.detection.lid import LIDConfig

    with pytest.raises(ValueError, match=r"^LID batch_size must be an integer >= 3, got 2"):
        LIDConfig(batch_size=2)
    assert type(LIDConfig(batch_size=np.int64(8)).batch_size) is int
    with pytest.raises(ValueError, match=r"^start \(a batch index\) must be an integer >= 0, got -1"):
        next(batches(np.zeros((4, 2, 2, 1), np.float32), 2, start=-1))


def test_timings_of_two_runs_sharing_a_cache_add_up(tmp_path):
    from jaxroute.utils.cache import Timings

    a, b = Timings(tmp_path / "t.json", ("x", "y")), Timings(tmp_path / "t.json", ("x", "y"))
    a.add("x", 2.0)
    b.add("y", 3.0)      # b was opened before a wrote: a's stage must survive b's write
    a.add("x", 1.0)
    assert json.loads((tmp_path / "t.json").read_text()) == {"x": 3.0, "y": 3.0}
    assert a.now == {"x": 3.0} and b.now == {"y": 3.0}
