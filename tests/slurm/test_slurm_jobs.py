"""Submission, sweeps, preemption and failures against the real local Slurm (.ci/slurm.sh).

The worker here is the stand-in (slurm_standin.py: same contract as neox.train.worker.run, a tiny
gloo data-parallel regression), so these tests cover the Slurm side alone in seconds per job.
test_slurm_launch.py runs the real trainer through `python launch.py cluster=slurm`.
"""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from neox.errors import LaunchError
from neox.launch import slurm as sl
from neox.train.preempt import EXIT_REQUEUE
from slurm_helpers import STANDIN, make_cfg, plan_for, steps_log, wait_until, write_config

pytestmark = pytest.mark.slurm


def submit(run_dir, **kw):
    cfg = make_cfg(run_dir, **kw)
    return sl.submit_job(cfg, plan_for(cfg), write_config(cfg, run_dir), run_dir, entry=STANDIN)


def losses(run_dir):
    return [r["loss"] for r in steps_log(run_dir) if "loss" in r]


def events(run_dir, kind):
    return [r for r in steps_log(run_dir) if r.get("event") == kind]


def test_two_task_job_completes_and_loss_falls(slurm, tmp_path, capsys):
    # Beside it, a job submitted with wait=false: submit returns once sbatch has taken it.
    quick = make_cfg(tmp_path / "nowait", steps=4, wait=False)
    t0 = time.time()
    assert sl.submit(quick, plan_for(quick), write_config(quick, tmp_path / "nowait"), tmp_path / "nowait",
                     entry=STANDIN) == 0
    assert time.time() - t0 < 10
    cfg = make_cfg(tmp_path / "run", steps=12)
    rc = sl.submit(cfg, plan_for(cfg), write_config(cfg, tmp_path / "run"), tmp_path / "run", entry=STANDIN)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Submitted Slurm job" in out and str(tmp_path / "run" / "slurm") in out and "completed" in out
    assert events(tmp_path / "run", "start")[0]["world"] == 2
    loss = losses(tmp_path / "run")
    assert len(loss) == 12 and loss[-1] < 0.5 * loss[0]
    wait_until(lambda: len(losses(tmp_path / "nowait")) == 4, 120, "the unwaited job to finish")


def test_sweep_jobs_go_out_together_and_run_in_their_own_dirs(slurm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sl, "_is_multirun", lambda: True)  # as under `launch.py -m`
    dirs = [tmp_path / f"job{i}" for i in range(3)]
    t0 = time.time()
    for d in dirs:  # what launch.py does for each Hydra job: submit returns at once
        cfg = make_cfg(d, steps=6, tasks_per_node=1)
        assert sl.submit(cfg, plan_for(cfg), write_config(cfg, d), d, entry=STANDIN) == 0
    submitted_s = time.time() - t0
    assert len(sl._PENDING) == 3 and submitted_s < 15
    assert sl.wait_pending() == 0
    assert not sl._PENDING
    ids = [line.split()[3].rstrip(":") for line in capsys.readouterr().out.splitlines() if line.startswith("Submitted")]
    assert len(set(ids)) == 3
    for d, job_id in zip(dirs, ids):
        assert len(losses(d)) == 6 and (d / "slurm" / f"{job_id}_0_log.out").exists()


def test_usr2_and_outside_requeue_resume_at_the_saved_step(slurm, tmp_path, capsys):
    """Jobs side by side: uninterrupted, USR2 mid-run, `scontrol requeue` from outside, and USR2
    with max_requeue=0 (the bound: it stops after saving and is not requeued)."""
    kw = dict(steps=30, save_every=10, step_sleep=0.25)
    ref, usr2, outside = (submit(tmp_path / n, **kw) for n in ("ref", "usr2", "outside"))
    bounded = submit(tmp_path / "bounded", steps=200, step_sleep=0.25, max_requeue=0)

    def interrupt(run, cmd, at):
        wait_until(lambda: len(losses(run.run_dir)) >= at, 180, f"job {run.job_id} to reach step {at}")
        subprocess.run(cmd + [run.job_id], check=True)

    threads = [
        threading.Thread(target=interrupt, args=(usr2, ["scancel", "--signal=USR2"], 6)),
        threading.Thread(target=interrupt, args=(outside, ["scontrol", "requeue"], 13)),
        threading.Thread(target=interrupt, args=(bounded, ["scancel", "--signal=USR2"], 2)),
    ]
    for t in threads:
        t.start()
    assert sl.wait([ref, usr2, outside]) == 0, capsys.readouterr()
    assert sl.wait([bounded]) == EXIT_REQUEUE
    for t in threads:
        t.join()
    out, err = capsys.readouterr()
    assert f"Slurm job {usr2.job_id} was requeued" in out

    # USR2: every rank stopped at the same step, saved it, and the requeued job started there.
    stop = events(usr2.run_dir, "stop")
    starts = events(usr2.run_dir, "start")
    assert len(stop) == 1 and stop[0]["signal"] == "SIGUSR2"
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["step"] == stop[0]["step"] >= 6
    # Outside requeue: resumed from the latest checkpoint (a periodic one, or the SIGTERM save).
    starts = events(outside.run_dir, "start")
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["step"] >= 10

    # Both end at the same final step with the same loss as the uninterrupted run.
    for run in (usr2, outside):
        last = [r for r in steps_log(run.run_dir) if "loss" in r][-1]
        ref_last = [r for r in steps_log(ref.run_dir) if "loss" in r][-1]
        assert last["step"] == ref_last["step"] == 30
        assert abs(last["loss"] - ref_last["loss"]) <= 1e-6, (last, ref_last)

    # max_requeue=0: one start, one stop, and the caller is told how to resume.
    assert len(events(bounded.run_dir, "start")) == 1 and len(events(bounded.run_dir, "stop")) == 1
    assert f"job {bounded.job_id} stopped for preemption" in err and "rerun the same command to resume" in err


def test_training_error_reaches_the_caller_with_the_log_path(slurm, tmp_path, capsys):
    cfg = make_cfg(tmp_path, steps=10)
    cfg.standin.raise_at = 3
    rc = sl.submit(cfg, plan_for(cfg), write_config(cfg, tmp_path), tmp_path, entry=STANDIN)
    err = capsys.readouterr().err
    assert rc == 1
    assert "training raised on rank 1" in err and "RuntimeError: standin: boom at step 3" in err
    assert str(tmp_path / "slurm") in err and "_1_log.err" in err


def test_scancel_ends_the_wait_with_a_message(slurm, tmp_path, capsys):
    run = submit(tmp_path, steps=1000, step_sleep=0.5)
    wait_until(lambda: len(losses(tmp_path)) >= 1, 120, "the job to start training")
    subprocess.run(["scancel", run.job_id], check=True)
    t0 = time.time()
    assert sl.wait([run]) == 1
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert f"job {run.job_id} was cancelled (scancel)" in err and str(tmp_path) in err


def test_rejected_partition_shows_the_sbatch_message(slurm, tmp_path):
    with pytest.raises(LaunchError, match=r"sbatch refused the job: .*[Ii]nvalid partition"):
        submit(tmp_path, partition="no_such_partition")


def test_resources_slurm_rejects_show_the_sbatch_message(slurm, tmp_path):
    # (An unknown account is refused only where accounting is enforced, i.e. with slurmdbd; the path
    # is the same: sbatch's own message.) Here: GPUs on a node without any, and too much memory.
    with pytest.raises(LaunchError, match=r"sbatch refused the job: .*[Ii]nvalid generic resource"):
        submit(tmp_path, gpus_per_node=1, tasks_per_node=1)
    with pytest.raises(LaunchError, match=r"sbatch refused the job: .*[Mm]emory specification"):
        submit(tmp_path, mem_gb=100000)


def test_a_job_that_can_never_start_is_said(slurm, tmp_path, capsys):
    run = submit(tmp_path, cpus_per_task=64)
    waiter = threading.Thread(target=sl.wait, args=([run],), daemon=True)
    waiter.start()
    try:
        wait_until(lambda: "PartitionConfig" in capsys.readouterr().err, 30, "the pending reason")
    finally:
        subprocess.run(["scancel", run.job_id], check=True)
        waiter.join(60)


def test_hydra_submitit_launcher_job_runs_the_worker_in_place(slurm, tmp_path):
    """Under hydra/launcher=submitit_slurm, launch.py already runs inside a Slurm task per rank."""
    import submitit

    cfg = make_cfg(tmp_path, steps=5)
    path = write_config(cfg, tmp_path)
    executor = submitit.SlurmExecutor(folder=tmp_path / "hydra")
    executor.update_parameters(ntasks_per_node=2, cpus_per_task=1, time=10, setup=["export OMP_NUM_THREADS=1"])
    job = executor.submit(sl.submit, cfg, plan_for(cfg), path, tmp_path, entry=STANDIN)
    assert job.results() == [0, 0]
    assert len(losses(tmp_path)) == 5 and not (tmp_path / "slurm").exists()
