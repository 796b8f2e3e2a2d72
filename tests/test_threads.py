"""The OpenMP waiting default that keeps training steady on shared cores, and the user's own
setting winning over it."""

import os
import subprocess
import sys

import pytest

SHOW = "import pipeline, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _env_after_import(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", SHOW], env={**clean, **env}, capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ["1000", "None"]),  # the default: short spinning, then sleep
        ({"GOMP_SPINCOUNT": "50000"}, ["50000", "None"]),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ["None", "ACTIVE"]),  # asked to spin: left alone
        ({"OMP_WAIT_POLICY": "PASSIVE"}, ["None", "PASSIVE"]),
    ],
)
def test_openmp_waiting_default_and_the_environment_winning(env, expected):
    assert _env_after_import(**env) == expected
