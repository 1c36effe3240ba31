"""The shared argument checks: one rule and one message, Python ints and floats out."""
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
