"""Run a statement of a test module in a fresh Python process with N CPU devices.

XLA fixes the host device count at start-up, so "N devices = 1 device" tests
run one side in a new process with ``--xla_force_host_platform_device_count``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_with_cpu_devices(devices: int, module: str, statement: str, *args) -> str:
    """Run ``statement`` with ``t`` = the test module ``module`` and ``argv`` = ``args`` as strings, in a
    process with ``devices`` CPU devices (asserted there); fails on a non-zero exit, returns stderr."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import jax; "
            f"import {module} as t; argv = sys.argv[3:]; "
            "assert jax.local_device_count() == int(sys.argv[2]), jax.local_device_count(); " + statement)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code, str(TESTS), str(devices), *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stderr
