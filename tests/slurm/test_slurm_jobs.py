"""Submission, sweeps, preemption, refusals and jobs that can never start, against the real local
Slurm (.ci/slurm.sh: partitions debug (default), short (MaxTime=20, MaxNodes=1) and maint (its only
node drained)).

The worker here is the stand-in (slurm_standin.py: same contract as neox.train.worker.run, a tiny
gloo data-parallel regression), so these tests cover the Slurm side alone in seconds per job.
test_slurm_launch.py runs the real trainer through `python launch.py cluster=slurm`.
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import pytest

import neox.launch.slurm.submission as submission
from neox.errors import LaunchError
from neox.launch import slurm as sl
from neox.train.preempt import EXIT_REQUEUE
from slurm_helpers import STANDIN, make_cfg, plan_for, slurm_record, steps_log, wait_until, write_config

pytestmark = pytest.mark.slurm


def submit(run_dir, **kw):
    cfg = make_cfg(run_dir, **kw)
    return sl.submit_job(plan_for(cfg), write_config(cfg, run_dir), run_dir, entry=STANDIN)


def losses(run_dir):
    return [r["loss"] for r in steps_log(run_dir) if "loss" in r]


def events(run_dir, kind):
    return [r for r in steps_log(run_dir) if r.get("event") == kind]


def test_two_task_job_completes_streaming_its_log(slurm, tmp_path, capsys):
    # Beside it, a job submitted with wait=false: submit returns once sbatch has taken it.
    quick = make_cfg(tmp_path / "nowait", steps=4, wait=False)
    t0 = time.time()
    assert sl.submit(plan_for(quick), write_config(quick, tmp_path / "nowait"), tmp_path / "nowait",
                     entry=STANDIN) == 0
    assert time.time() - t0 < 10
    cfg = make_cfg(tmp_path / "run", steps=12)
    rc = sl.submit(plan_for(cfg), write_config(cfg, tmp_path / "run"), tmp_path / "run", entry=STANDIN)
    out = capsys.readouterr().out
    assert rc == 0, out
    job_id = re.search(r"Submitted Slurm job (\d+) \(run\)", out).group(1)
    assert str(tmp_path / "run" / "slurm") in out and f"Slurm job {job_id} completed" in out
    # Rank 0's log reached the terminal while waiting, in order, without submitit's own lines.
    streamed = [line for line in out.splitlines() if line.startswith("standin ")]
    assert streamed == [line for line in (tmp_path / "run" / "slurm" / f"{job_id}_0_log.out").read_text().splitlines()
                        if line.startswith("standin ")]
    assert streamed[0].startswith("standin step 1/12") and streamed[-1] == "standin done: 12 steps"
    assert "submitit INFO" not in out
    assert events(tmp_path / "run", "start")[0]["world"] == 2
    loss = losses(tmp_path / "run")
    assert len(loss) == 12 and loss[-1] < 0.5 * loss[0]
    record = slurm_record(job_id)
    assert (record["JobState"], record["ExitCode"], record["JobName"]) == ("COMPLETED", "0:0", "run")
    wait_until(lambda: len(losses(tmp_path / "nowait")) == 4, 120, "the unwaited job to finish")


def test_sweep_jobs_go_out_together_and_run_in_their_own_dirs(slurm, tmp_path, capsys):
    dirs = [tmp_path / f"job{i}" for i in range(3)]
    t0 = time.time()
    for d in dirs:  # what launch.py -m does for each run: submit without waiting, then wait for all
        cfg = make_cfg(d, steps=6, tasks_per_node=1, wait=False)
        assert sl.submit(plan_for(cfg), write_config(cfg, d), d, entry=STANDIN) == 0
    assert time.time() - t0 < 15
    assert sl.wait_for(dirs) == 0
    out = capsys.readouterr().out
    ids = re.findall(r"Submitted Slurm job (\d+)", out)
    assert len(set(ids)) == 3
    for d, job_id in zip(dirs, ids):
        assert len(losses(d)) == 6 and (d / "slurm" / f"{job_id}_0_log.out").exists()
        assert f"[{d.name}] standin done: 6 steps" in out  # each job's log, streamed under its name


@pytest.mark.slow  # ~55 s on 2 cores: four jobs side by side, two of them requeued
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
    assert f"requeued job {usr2.job_id} (requeue 1 of at most 3); it resumes" in usr2.log(0).read_text()
    # Outside requeue: resumed from the latest checkpoint (a periodic one, or the SIGTERM save).
    starts = events(outside.run_dir, "start")
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["step"] >= 10

    # Both end at the same final step with the same loss as the uninterrupted run.
    for run in (usr2, outside):
        last = [r for r in steps_log(run.run_dir) if "loss" in r][-1]
        ref_last = [r for r in steps_log(ref.run_dir) if "loss" in r][-1]
        assert last["step"] == ref_last["step"] == 30
        assert abs(last["loss"] - ref_last["loss"]) <= 1e-6, (last, ref_last)

    # max_requeue=0: one start, one stop; the job's log says why it is not requeued (and never
    # that it resumes), the caller is told how to resume, and Slurm records the early stop as a
    # failure with the trainer's status, as the launcher reports it.
    assert len(events(bounded.run_dir, "start")) == 1 and len(events(bounded.run_dir, "stop")) == 1
    assert f"job {bounded.job_id} stopped for preemption" in err and "rerun the same command to resume" in err
    log = bounded.log(0).read_text()
    assert "is not requeued: it was requeued 0 times already (cluster.max_requeue=0)" in log
    assert "resumes" not in log
    record = slurm_record(bounded.job_id)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", f"{EXIT_REQUEUE}:0")


def test_training_error_reaches_the_caller_with_the_log_path(slurm, tmp_path, capsys):
    cfg = make_cfg(tmp_path, steps=10)
    cfg.standin.raise_at = 3
    rc = sl.submit(plan_for(cfg), write_config(cfg, tmp_path), tmp_path, entry=STANDIN)
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
    # The stand-in saved on the SIGTERM; the job's own log says it is not requeued, not that it resumes.
    log = run.log(0).read_text()
    assert "so it is not requeued; rerun the same command to resume" in log and "it resumes" not in log


def test_refused_submissions_say_why_and_leave_nothing(slurm, tmp_path):
    """Refused before sbatch (the partition's limits) or by sbatch itself: one line naming the field
    and the limit; the job's slurm/ dir is not left behind."""
    cases = [
        (dict(partition="no_such_partition"),
         r"cluster.partition=no_such_partition is not a partition of this cluster \(there are: debug, short, maint\)"),
        (dict(partition="short", time_min=30),
         r"cluster.time_min=30 is above the MaxTime of partition short \(20 min\): set cluster.time_min=20 or less"),
        (dict(partition="short", time_min=20, nodes=2, tasks_per_node=1),
         r"cluster.nodes=2 is more than partition short allows \(MaxNodes=1\): set cluster.nodes=1"),
        (dict(cpus_per_task=2),
         r"cluster.cpus_per_task=2 × 2 tasks per node = 4 CPUs per node, but the nodes of partition debug have at "
         r"most 2: set cluster.cpus_per_task=1"),
        (dict(gpus_per_node=1, tasks_per_node=1),
         r"cluster.gpus_per_node=1 but partition debug has no GPUs .*: set cluster.gpus_per_node=0"),
        (dict(mem_gb=100000), r"sbatch refused the job: .*[Mm]emory specification"),  # sbatch's own message
    ]
    for i, (cluster, message) in enumerate(cases):
        with pytest.raises(LaunchError, match=message):
            submit(tmp_path / str(i), **cluster)
        assert not (tmp_path / str(i) / "slurm").exists()


@pytest.mark.timeout(120)  # before the fix the wait never ended
def test_jobs_that_can_never_start_are_cancelled_with_the_reason(slurm, tmp_path, monkeypatch, capsys):
    """Held (cluster.sbatch_extra.hold), a partition whose node is drained, and a time limit above the
    partition's MaxTime on a Slurm whose limits cannot be read before submitting: each is cancelled
    after cluster.hopeless_pending_s, said once with its reason and the field to change."""
    monkeypatch.setattr(submission, "find_partition", lambda name: None)
    held = submit(tmp_path / "held", sbatch_extra={"hold": True}, hopeless_pending_s=2)
    drained = submit(tmp_path / "drained", partition="maint", tasks_per_node=1, hopeless_pending_s=2)
    too_long = submit(tmp_path / "too_long", partition="short", time_min=30, hopeless_pending_s=2)
    t0 = time.time()
    assert sl.wait([held, drained, too_long]) == 2
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    expected = [
        (held, r"reason JobHeldUser: it is held .*`scontrol release`"),
        (drained, r"reason ReqNodeNotAvail: every node of partition maint is drained or down: pick another "
                  r"cluster.partition"),
        (too_long, r"reason PartitionTimeLimit: its time limit is above the MaxTime of partition short: lower "
                   r"cluster.time_min"),
    ]
    for run, why in expected:
        said = [line for line in err.splitlines() if f"Slurm job {run.job_id} " in line]
        assert len(said) == 1, err  # once
        assert said[0].startswith(f"neox: error: Slurm job {run.job_id} ({run.name}) can never start")
        assert re.search(why, said[0]) and said[0].endswith("It was cancelled"), said[0]
        assert slurm_record(run.job_id)["JobState"] == "CANCELLED"
        assert not run.log_dir.exists()  # nothing ran: no logs to point to, none left behind


def test_scancel_before_the_job_starts_points_to_no_log(slurm, tmp_path, capsys):
    """Cancelled while still queued (held here, with hopeless_pending_s=null so only scancel ends it):
    said as such, with no pointer to logs that were never written, and nothing left in slurm/."""
    run = submit(tmp_path, sbatch_extra={"hold": True}, hopeless_pending_s=None)
    threading.Timer(2.0, subprocess.run, args=(["scancel", run.job_id],)).start()
    assert sl.wait([run]) == 1
    err = capsys.readouterr().err
    assert f"job {run.job_id} was cancelled (scancel) before it started; nothing ran" in err
    assert "_log." not in err and not run.log_dir.exists()


def _folder(log_dir) -> dict:
    """Every entry of slurm/: a file's bytes, a symlink's target."""
    return {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in log_dir.iterdir()}


def test_an_earlier_jobs_logs_survive_a_later_submission_cancelled_before_it_starts(slurm, tmp_path, capsys):
    """A resumed run submits into the slurm/ folder of its earlier job. A new job cancelled before it
    starts takes away exactly what its submission wrote (submitit's script, pickle and symlink, the job
    record naming it); the earlier job's logs, results and submission files stay, byte for byte
    (before: every file of slurm/ was deleted)."""
    first = submit(tmp_path, steps=2, save_every=1)
    assert sl.wait([first]) == 0
    earlier = _folder(first.log_dir)
    assert {f"{first.job_id}_0_log.out", f"{first.job_id}_1_log.err", f"{first.job_id}_0_result.pkl",
            f"{first.job_id}_submission.sh"} <= set(earlier)
    second = submit(tmp_path, steps=2, sbatch_extra={"hold": True}, hopeless_pending_s=None)
    assert {f"{second.job_id}_submission.sh", f"{second.job_id}_submitted.pkl"} <= set(_folder(first.log_dir))
    threading.Timer(2.0, subprocess.run, args=(["scancel", second.job_id],)).start()
    assert sl.wait([second]) == 1
    assert f"job {second.job_id} was cancelled (scancel) before it started" in capsys.readouterr().err
    del earlier["job.json"]  # the record of the job last submitted: it named the cancelled job
    assert _folder(first.log_dir) == earlier
    assert len(losses(tmp_path)) == 2  # the run dir keeps the earlier job's work


def test_hydra_submitit_launcher_job_runs_the_worker_in_place(slurm, tmp_path):
    """Under hydra/launcher=submitit_slurm, launch.py already runs inside a Slurm task per rank."""
    import submitit

    cfg = make_cfg(tmp_path, steps=5)
    path = write_config(cfg, tmp_path)
    executor = submitit.SlurmExecutor(folder=tmp_path / "hydra")
    executor.update_parameters(ntasks_per_node=2, cpus_per_task=1, time=10, setup=["export OMP_NUM_THREADS=1"])
    job = executor.submit(sl.submit, plan_for(cfg), path, tmp_path, entry=STANDIN)
    assert job.results() == [0, 0]
    assert len(losses(tmp_path)) == 5 and not (tmp_path / "slurm").exists()
