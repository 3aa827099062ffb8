"""End-to-end training through launch.py and the real deepspeed launcher (2 CPU processes, gloo)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launch_helpers import REPO, TINY, launch, read_metrics, train_losses

pytestmark = pytest.mark.usefixtures("embedded_ready")


def test_two_processes_train_save_and_resume(tmp_path):
    run = tmp_path / "run"
    secret = "wandb-secret-do-not-log-1234"
    os.environ["WANDB_API_KEY"] = secret
    try:
        first = launch([*TINY, "train.steps=6", "train.save_every=3", "train.eval_every=3",
                        "logging.wandb=true", "logging.tensorboard=true", f"run_dir={run}"])
    finally:
        del os.environ["WANDB_API_KEY"]
    assert "2 CPU processes (gloo) = tp 1 x pp 1 x dp 2" in first.stdout
    losses = train_losses(run)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    assert any("valid/loss" in r for r in read_metrics(run))
    for artifact in ("config.yaml", "loss.png", "checkpoints/latest", "tb", "wandb"):
        assert (run / artifact).exists(), artifact
    # The W&B key never reaches logs, saved configs or the W&B files.
    for path in run.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in first.stdout + first.stderr

    # The same command with more steps resumes at the saved step instead of starting over.
    second = launch([*TINY, "train.steps=9", "train.save_every=3", "train.eval_every=3", f"run_dir={run}"])
    assert "resumed from step_00000006 at step 6" in second.stdout
    steps = [s for s, _ in train_losses(run)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [*TINY, "train.save_every=4", "optim.decay_steps=8"]
    launch([*common, "train.steps=8", f"run_dir={whole}"])
    launch([*common, "train.steps=4", f"run_dir={split}"])
    launch([*common, "train.steps=8", f"run_dir={split}"])
    assert train_losses(split) == train_losses(whole)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains(tmp_path, stage):
    run = tmp_path / f"zero{stage}"
    launch([*TINY, f"parallelism={'single' if stage == 0 else f'zero{stage}'}", "train.steps=5", "train.save_every=5", f"run_dir={run}"])
    losses = [loss for _, loss in train_losses(run)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3, losses


def test_worker_runs_alone_without_a_launcher(tmp_path):
    """`python -m neox.train config.yaml` with no launcher env is a one-process world."""
    run = tmp_path / "alone"
    launch([*TINY, "cluster.cpu_procs=1", "train.steps=2", "dry_run=true", f"run_dir={run}"])
    from neox.launch.compose import compose_config
    from neox.launch.job import save_config

    cfg = compose_config([*TINY, "cluster.cpu_procs=1", "train.steps=2", f"run_dir={run}"])
    config = save_config(cfg, run)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "neox.train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in train_losses(run)] == [1, 2]


def test_failing_worker_exit_status_reaches_the_caller(tmp_path):
    """A bad data path found only inside the workers ends with their non-zero status."""
    run = tmp_path / "bad"
    proc = launch([*TINY, "train.steps=2", f"run_dir={run}", "data.embedded_vocab=70000"], check=False)
    assert proc.returncode != 0
    assert "vocab" in (proc.stdout + proc.stderr)


def test_injected_nan_is_skipped_and_repeated_nans_stop_the_run(tmp_path):
    run = tmp_path / "nan"
    os.environ["NEOX_FAULT_NAN_STEPS"] = "3"
    try:
        proc = launch([*TINY, "train.steps=5", "train.save_every=2", f"run_dir={run}"])
    finally:
        del os.environ["NEOX_FAULT_NAN_STEPS"]
    assert "step 3: non-finite loss or gradients, step skipped (1 in a row, 1 in all)" in proc.stdout
    records = [r for r in read_metrics(run) if "train/loss" in r]
    assert records[-1]["train/skipped_steps"] == 1
    assert all(r["train/loss"] == r["train/loss"] for r in records if r["step"] != 3)  # finite elsewhere

    stop = tmp_path / "nan_stop"
    os.environ["NEOX_FAULT_NAN_STEPS"] = "3,4,5,6"
    try:
        proc = launch([*TINY, "train.steps=8", "train.save_every=2", "train.max_nonfinite_steps=3",
                       f"run_dir={stop}"], check=False)
    finally:
        del os.environ["NEOX_FAULT_NAN_STEPS"]
    assert proc.returncode != 0
    # Steps 3-5 are skipped (the weights stay those of step 2, so the save at step 4 is good);
    # the run stops at step 5 without saving.
    assert "3 non-finite steps in a row" in proc.stderr and "step_00000004" in proc.stderr
    assert (stop / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_a_hung_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    import time

    run = tmp_path / "hang"
    os.environ["NEOX_FAULT_HANG"] = "1:3"
    start = time.monotonic()
    try:
        proc = launch([*TINY, "train.steps=6", "train.save_every=100", "train.collective_timeout_s=15",
                       f"run_dir={run}"], check=False, timeout=240)
    finally:
        del os.environ["NEOX_FAULT_HANG"]
    assert proc.returncode != 0
    assert time.monotonic() - start < 200
    assert "rank(s) 1 did not reach it" in proc.stderr, proc.stderr[-2000:]
