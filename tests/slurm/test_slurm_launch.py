"""End to end: `python launch.py cluster=slurm ...` with the real trainer on the local Slurm."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from slurm_helpers import slurm_record, wait_until
from support.runs import REPO, launch, tiny, train_losses

pytestmark = pytest.mark.slurm

# The shared tiny run (support.runs.TINY) as 2-task CPU Slurm jobs: 20 steps, evaluated and saved at 10.
TINY = tiny("cluster=slurm", "model=tiny", "train.steps=20", "train.eval_every=10", "train.save_every=10",
            "cluster.gpus_per_node=0", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1", "cluster.time_min=30",
            "cluster.signal_delay_s=5")


@pytest.fixture(scope="module", autouse=True)
def corpus(embedded_ready):
    """The embedded corpus, built once here (tests/conftest.py), not by several jobs at once."""


def start(*args: str) -> subprocess.Popen:
    """launch.py in the background, its output read line by line by the test."""
    return subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_launch_sweep_runs_3_parallel_jobs_each_in_its_own_dir(slurm, tmp_path):
    """The run dirs come from an interpolation of the swept value; the jobs are named after the runs."""
    res = launch(["-m", *TINY, "cluster.tasks_per_node=1", "train.steps=6", "train.eval_every=6", "train.save_every=6",
                  "optim.lr=1e-3,2e-3,3e-3", f"run_dir={tmp_path}/lr_${{optim.lr}}"], timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Submitting the 3 runs of this sweep as 3 Slurm jobs" in res.stdout
    assert "jobs locally" not in res.stdout + res.stderr
    ids = re.findall(r"Submitted Slurm job (\d+)", res.stdout)
    assert len(set(ids)) == 3
    for n, (lr, job_id) in enumerate(zip(("0.001", "0.002", "0.003"), ids)):
        run_dir = tmp_path / f"lr_{lr}"
        assert max(train_losses(run_dir)) == 6, run_dir  # launch.py returned only once every job had ended
        assert slurm_record(job_id)["JobName"] == f"lr_{lr}_{n}"
        assert re.search(rf"^\[lr_{lr}_{n}\] step +6/6 ", res.stdout, re.M)  # each job's log, streamed


@pytest.mark.parametrize("extra", ["cluster.sbatch_extra={mail-type:END,hold:true}", "cluster.sbatch_extra.hold=true"])
def test_launch_held_job_is_cancelled_and_leaves_no_run_dir(slurm, tmp_path, capsys, extra):
    """cluster.sbatch_extra as the README writes it reaches sbatch; a job that can never start (held
    here) is cancelled after cluster.hopeless_pending_s with its reason, and leaves nothing behind."""
    from neox.launch.cli import main

    run_dir = tmp_path / "held"
    assert main([*TINY, extra, "cluster.hopeless_pending_s=2", f"run_dir={run_dir}"]) == 2
    out, err = capsys.readouterr()
    job_id = re.search(r"Submitted Slurm job (\d+)", out).group(1)
    record = slurm_record(job_id)
    assert record["JobState"] == "CANCELLED" and record.get("MailType") == ("END" if "mail-type" in extra else None)
    assert re.search(rf"^neox: error: Slurm job {job_id} \(held\) can never start: it pended 2 s with reason "
                     r"JobHeldUser: .*It was cancelled$", err, re.M), err
    assert err.count(f"Slurm job {job_id} ") == 1 and "_log.err" not in err
    assert not run_dir.exists()


@pytest.mark.slow  # ~55 s on 2 cores: three trainer jobs side by side, one requeued, one cancelled
def test_launch_2_task_job_loss_falls_and_usr2_resumes_exactly(slurm, tmp_path):
    """Runs side by side: one plain (its loss must fall, its log streams to the terminal), one
    signalled with USR2 mid-run (it must requeue, resume at the step it saved and end like the plain
    one), and a 1-rank one cancelled mid-run. The last two log to W&B, whose service dies with the
    signals: their logs must not end in W&B's "Connection lost" traceback."""
    ref = start(*TINY, f"run_dir={tmp_path / 'ref'}")
    run = start(*TINY, f"run_dir={tmp_path / 'usr2'}", "logging.wandb=true")
    cancel = start(*TINY, f"run_dir={tmp_path / 'cancel'}", "logging.wandb=true", "cluster.tasks_per_node=1",
                   "train.steps=5000")  # cancelled at step 2+; never to finish first on a slow machine
    try:
        job_ids = {}
        for name, proc in (("usr2", run), ("cancel", cancel)):
            for line in proc.stdout:  # the summary comes first, then the job id
                m = re.search(r"Submitted Slurm job (\d+)", line)
                if m:
                    job_ids[name] = m.group(1)
                    break
            assert job_ids.get(name), f"launch.py printed no job id for {name}"
        wait_until(lambda: max(train_losses(tmp_path / "usr2"), default=0) >= 4, 180, "step 4")
        subprocess.run(["scancel", "--signal=USR2", job_ids["usr2"]], check=True)
        wait_until(lambda: max(train_losses(tmp_path / "cancel"), default=0) >= 2, 180, "step 2 of the cancelled")
        subprocess.run(["scancel", job_ids["cancel"]], check=True)
        out = run.communicate(timeout=300)[0]
        assert run.returncode == 0, out
        cancel_out = cancel.communicate(timeout=120)[0]
        assert cancel.returncode == 1, cancel_out
        ref_out = ref.communicate(timeout=300)[0]
        assert ref.returncode == 0, ref_out
    finally:
        for p in (ref, run, cancel):
            if p.poll() is None:
                p.kill()
    assert re.search(r"Submitted Slurm job \d+", ref_out) and str(tmp_path / "ref" / "slurm") in ref_out
    a = train_losses(tmp_path / "ref")
    assert sorted(a) == list(range(1, 21)) and a[20] < a[1] - 0.5
    # Rank 0's step lines and final summary reached the terminal, as a local run prints them.
    assert re.search(r"^step +20/20 +loss ", ref_out, re.M) and re.search(r"^done: 20 steps", ref_out, re.M)

    job_id = job_ids["usr2"]
    assert f"Slurm job {job_id} was requeued" in out
    log = (tmp_path / "usr2" / "slurm" / f"{job_id}_0_log.out").read_text()
    stopped = int(re.search(r"stopping at step (\d+) \(SIGUSR2\): checkpoint saved$", log, re.M).group(1))
    assert f"requeued job {job_id} (requeue 1 of at most 3); it resumes from the checkpoint" in log
    assert re.search(rf"resumed from .* at step {stopped}\b", log), log[-3000:]
    b = train_losses(tmp_path / "usr2")
    assert max(a) == max(b) == 20
    assert abs(a[20] - b[20]) <= 1e-6, (a[20], b[20])

    # The cancelled job: its log says it is not requeued (never that it resumes), and no traceback.
    job_id = job_ids["cancel"]
    log = (tmp_path / "cancel" / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "so it is not requeued; rerun the same command to resume from the checkpoint" in log
    assert "resumes" not in log
    assert f"job {job_id} was cancelled (scancel)" in cancel_out
    for name in ("usr2", "cancel"):
        for err in (tmp_path / name / "slurm").glob("*_log.err"):
            text = err.read_text()
            assert "Traceback" not in text and "Connection lost')" not in text, (err, text[-3000:])
