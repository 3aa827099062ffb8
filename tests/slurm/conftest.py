"""Fixtures for the Slurm tests: a real single-node Slurm on this machine, started by .ci/slurm.sh.

`slurm` (session): makes sure the local Slurm is up and exports its SLURM_CONF and the sacct
stand-in on PATH for this process and everything it starts. Where it cannot be started (not
root, no apt-get, NEOX_SLURM_TESTS=0) the tests skip with the reason; under CI=true they fail.
The cluster is left running after the session (`.ci/slurm.sh stop` stops it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = REPO / ".ci" / "slurm.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true but the local Slurm is unavailable: {reason}")
    pytest.skip(f"local Slurm unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm() -> str:
    """The local Slurm's environment (SLURM_CONF, PATH), set in os.environ for the session; the value
    is the SLURM_CONF path."""
    if os.environ.get("NEOX_SLURM_TESTS") == "0":
        _unavailable("NEOX_SLURM_TESTS=0")
    if os.geteuid() != 0:
        _unavailable(".ci/slurm.sh needs root to install and run slurmd (run as root, or in CI)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _unavailable("Slurm is not installed and there is no apt-get to install it")
    res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    if res.returncode:
        _unavailable(f".ci/slurm.sh start failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH", "PYTHONPATH")}
    for line in res.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            os.environ[key] = value.replace("$PATH", os.environ["PATH"])
    # The jobs import the stand-in worker (slurm_standin:run) from here: sbatch passes the environment on.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), saved["PYTHONPATH"]]))
    yield os.environ["SLURM_CONF"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
