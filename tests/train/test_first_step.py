"""The first step of every start is reported at once, whatever train.log_every says (issue 13: a slow
first step, e.g. a long sequence on CPU, used to leave the user without a line for minutes)."""
from __future__ import annotations

import pytest

from support.runs import launch, read_metrics, tiny

pytestmark = pytest.mark.slow


def logged_steps(run) -> list:
    return [r["step"] for r in read_metrics(run) if "train/loss" in r]


def test_first_step_of_each_start_is_logged(tmp_path):
    run = tmp_path / "run"
    args = tiny("train.log_every=10", "cluster.cpu_procs=1", f"run_dir={run}")
    launch([*args, "train.steps=3"])
    assert logged_steps(run) == [1, 3]  # step 1 at once, then the last step
    out = launch([*args, "train.steps=5"])
    assert "resumed from step_00000003" in out.stdout + out.stderr
    assert logged_steps(run) == [1, 3, 4, 5]  # the resumed start's first step (4) is reported too
