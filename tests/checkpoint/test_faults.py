"""Trainer guards seen from the checkpoint side (2 real CPU processes through launch.py): a NaN
step is skipped; repeated NaNs stop the run with the last good checkpoint intact. (A hung rank:
tests/test_train.py::test_a_hung_rank_ends_the_job_within_the_collective_timeout.)"""
from __future__ import annotations

import pytest

from ckpt_helpers import launch
from neox.checkpoint.manager import CheckpointManager

pytestmark = pytest.mark.slow


def test_nan_steps_skipped_then_repeated_nans_stop_with_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nans"
    out = launch(run, "train.steps=8", "train.save_every=4", "train.max_nonfinite_steps=2",
                 env={"NEOX_FAULT_NAN_STEPS": "3,6,7"})
    assert "step 3: non-finite loss or gradients, step skipped" in out.stdout, out.stdout[-4000:]
    assert out.returncode != 0
    assert "2 non-finite steps in a row" in out.stdout and "step_00000004" in out.stdout, out.stdout[-4000:]
    manager = CheckpointManager(run / "checkpoints", 3, True)
    assert manager.latest_tag() == "step_00000004" and manager.verify("step_00000004") is None
    assert manager.read_state("step_00000004")["run_state"]["skipped_steps"] == 1
