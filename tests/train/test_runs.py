"""End-to-end training through launch.py and the real deepspeed launcher (2 CPU processes, gloo).

Each launch costs ~10 s of start-up on 2 cores, so the runs are shared: one ZeRO-3 run (`dp2`, the
stage with the most machinery: partitioned parameters) serves the artifact, logging and exact-resume
checks; the non-finite policy (skip, count, stop) is one run of the workers alone (no launcher:
support.runs.workers) per optimizer path (ZeRO-0: torch's step; ZeRO-2: DeepSpeed's partitioned
optimizer, the same class as ZeRO-1). What needs no worker is
tested in-process elsewhere: ZeRO-0 with dp=2 is tests/checkpoint's reference run, ZeRO-1 with
dp=2 is tests/parallel/test_tp_deepspeed.py (exact against plain torch), the skip step itself and
the ranks' agreement are test_guards.py and test_agreement.py, a worker alone and the numbers of a
run are test_golden.py.
The non-finite run also checks the checkpoint side (the last good checkpoint verifies and records
the skips), which tests/checkpoint/test_faults.py repeats with a launch of its own.
"""
from __future__ import annotations

import time

import pytest

from neox.checkpoint.manager import CheckpointManager
from support.runs import TINY, at_checkpoint, launch, read_metrics, train_losses, workers

pytestmark = pytest.mark.usefixtures("embedded_ready")

SECRET = "wandb-secret-do-not-log-1234"
# 8 steps, saves at 4 and 8; decay_steps fixed so the lr of a step does not depend on train.steps.
DP2 = [*TINY, "parallelism=zero3", "train.save_every=4", "train.eval_every=4", "optim.decay_steps=8"]


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """2 processes, ZeRO-3, 8 steps with TensorBoard and W&B (offline) on and a W&B key in the env."""
    run = tmp_path_factory.mktemp("runs") / "dp2"
    out = launch([*DP2, "train.steps=8", "logging.wandb=true", "logging.tensorboard=true", f"run_dir={run}"],
                 env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})
    return run, out


def test_two_processes_train_with_every_artifact_and_no_secret(dp2):
    run, out = dp2
    assert "2 CPU processes (gloo) = tp 1 x pp 1 x dp 2" in out.stdout
    losses = train_losses(run)
    assert list(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.3, losses
    assert [r["step"] for r in read_metrics(run) if "valid/loss" in r] == [4, 8]
    for artifact in ("config.yaml", "loss.png", "checkpoints/step_00000004", "checkpoints/step_00000008", "tb",
                     "wandb"):
        assert (run / artifact).exists(), artifact
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    # The W&B key never reaches the logs, the saved config, the metrics or W&B's own files.
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out.stdout + out.stderr
    # The start-up breakdown: one line, and its phases on record from the launcher's start to the first step.
    assert "start-up: " in out.stdout and "from launch.py to the end of the first step" in out.stdout
    startup = next(r for r in read_metrics(run) if "startup/total_s" in r)
    parts = ["startup/launcher_launch_py_s", "startup/launcher_deepspeed_launcher_s"]  # inside launcher_s
    phases = [k for k in startup if k.startswith("startup/") and k not in ("startup/total_s", *parts)]
    assert [p.split("/")[1] for p in phases] == ["launcher_s", "imports_s", "distributed_s", "plan_s", "model_s",
                                                 "engine_s", "data_s", "resume_s", "first_step_s"]
    assert startup["startup/total_s"] == pytest.approx(sum(startup[p] for p in phases), abs=0.01)
    assert all(startup[p] >= 0 for p in phases + parts) and 1 < startup["startup/total_s"] < 600
    assert startup[parts[0]] + startup[parts[1]] == pytest.approx(startup["startup/launcher_s"], abs=0.01)


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(dp2, tmp_path):
    """A run dir holding dp2's step-4 checkpoint, its workers started again with the same config (alone:
    resuming is theirs; resumes through launch.py are tests/checkpoint's): it says it resumes at step 4
    and computes dp2's losses exactly (same machine, same kernels). With train.log_every=10 it logs the
    first step of its start (5) at once, then the last (8: the mean of steps 6-8)."""
    src, _ = dp2
    run = at_checkpoint(src, tmp_path / "split", "step_00000004")
    out = workers([*DP2, "train.steps=8", "train.log_every=10", f"run_dir={run}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from step_00000004 at step 4" in out.stdout
    whole, resumed = train_losses(src), train_losses(run)
    assert list(resumed) == [5, 8]
    assert resumed[5] == whole[5]
    assert resumed[8] == pytest.approx((whole[6] + whole[7] + whole[8]) / 3, rel=1e-6)


@pytest.mark.parametrize("parallelism", [
    "single",
    "zero2",  # DeepSpeed's own overflow check skips the step before our optimizer is called
])
def test_non_finite_steps_are_skipped_counted_and_too_many_in_a_row_stop_the_run(tmp_path, parallelism):
    """Step 3 is skipped alone; 5, 6, 7 are skipped in a row and the third stops the run without saving.
    The skipped steps leave the weights of step 4, so the save at step 6 is good. The workers alone
    (support.runs.workers): the policy is theirs; the launcher's part of a failing run is the hung-rank test's."""
    run = tmp_path / "nan"
    proc = workers([*TINY, f"parallelism={parallelism}", "train.steps=10", "train.save_every=2",
                    "train.max_nonfinite_steps=3", f"run_dir={run}"], env={"NEOX_FAULT_NAN_STEPS": "3,5,6,7"})
    assert proc.returncode != 0
    assert "step 3: non-finite loss or gradients, step skipped (1 in a row, 1 in all)" in proc.stdout
    assert "step 7: non-finite loss or gradients, step skipped (3 in a row, 4 in all)" in proc.stdout
    assert "3 non-finite steps in a row" in proc.stderr and "step_00000006" in proc.stderr, proc.stderr[-2000:]
    records = {r["step"]: r for r in read_metrics(run) if "train/loss" in r}  # step 7 stopped before its record
    assert [records[s]["train/skipped_steps"] for s in sorted(records)] == [0, 0, 1, 1, 2, 3]
    assert all(records[s]["train/loss"] == records[s]["train/loss"] for s in (1, 2, 4))  # finite
    checkpoints = CheckpointManager(run / "checkpoints", 3, is_main=True)
    assert checkpoints.latest_tag() == "step_00000006" and checkpoints.verify("step_00000006") is None
    assert checkpoints.read_state("step_00000006")["run_state"]["skipped_steps"] == 3


def test_a_hung_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    run = tmp_path / "hang"
    start = time.monotonic()
    proc = launch([*TINY, "train.steps=6", "train.save_every=100", "train.collective_timeout_s=10",
                   f"run_dir={run}"], check=False, timeout=240, env={"NEOX_FAULT_HANG": "1:3"})
    assert proc.returncode != 0
    assert time.monotonic() - start < 200
    assert "rank(s) 1 did not reach it" in proc.stderr, proc.stderr[-2000:]
    # A failing worker is one line from its rank, no traceback from any process of the launch.
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
