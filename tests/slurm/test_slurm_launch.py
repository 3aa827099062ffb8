"""End to end: `python launch.py cluster=slurm ...` with the real trainer on the local Slurm."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TINY = [
    "cluster=slurm", "model=tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64",
    "train.micro_batch=4", "train.grad_accum=1", "optim.warmup_steps=2",
    "train.steps=20", "train.log_every=1", "train.eval_every=10", "train.eval_batches=2",
    "train.save_every=10", "logging.wandb=false", "logging.tensorboard=false",
    "cluster.gpus_per_node=0", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1",
    "cluster.time_min=30", "cluster.signal_delay_s=5",
]


@pytest.fixture(scope="module", autouse=True)
def needs_trainer(request):
    if not (REPO / "launch.py").exists() or not (REPO / "neox" / "train" / "worker.py").exists():
        pytest.skip("launch.py / neox.train.worker are not in this tree yet")
    try:  # build the embedded corpus once here (tests/conftest.py), not in several jobs at once
        request.getfixturevalue("embedded_ready")
    except pytest.FixtureLookupError:
        pass


def needs_in_tree(path: str, marker: str, what: str) -> None:
    """Until the lead's side lands (see the Slurm report), say so instead of failing; CI fails."""
    if marker not in (REPO / path).read_text() and not IN_CI:
        pytest.skip(f"{path} does not {what} yet ({marker} not used there)")


def launch(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def train_losses(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_launch_sweep_runs_3_parallel_jobs_each_in_its_own_dir(slurm, tmp_path):
    needs_in_tree("neox/launch/cli.py", "wait_pending", "wait for a sweep's Slurm jobs")
    res = launch("-m", *TINY, "cluster.tasks_per_node=1", "train.steps=6", "train.eval_every=6", "train.save_every=6",
                 "optim.lr=1e-3,2e-3,3e-3", f"hydra.sweep.dir={tmp_path}", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"Submitted Slurm job (\d+)", res.stdout)
    assert len(set(ids)) == 3
    dirs = sorted(p for p in tmp_path.iterdir() if (p / "config.yaml").exists())
    assert len(dirs) == 3
    for d in dirs:  # launch.py returned only once every job had ended
        assert max(train_losses(d)) == 6, d


def test_launch_2_task_job_loss_falls_and_usr2_resumes_exactly(slurm, tmp_path):
    """Two runs side by side: one plain (its loss must fall), one signalled with USR2 mid-run
    (it must requeue, resume at the step it saved and end like the plain one)."""
    preempt = "PreemptionWatcher" in (REPO / "neox/train/worker.py").read_text() or IN_CI
    ref = start(*TINY, f"run_dir={tmp_path / 'ref'}")
    run = start(*TINY, f"run_dir={tmp_path / 'usr2'}") if preempt else None
    try:
        job_id = None
        if run is not None:
            for line in run.stdout:  # the summary comes first, then the job id
                m = re.search(r"Submitted Slurm job (\d+)", line)
                if m:
                    job_id = m.group(1)
                    break
            assert job_id, "launch.py printed no job id"
            wait_until(lambda: max(train_losses(tmp_path / "usr2"), default=0) >= 4, 180, "step 4")
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
            out = run.communicate(timeout=300)[0]
            assert run.returncode == 0, out
        ref_out = ref.communicate(timeout=300)[0]
        assert ref.returncode == 0, ref_out
    finally:
        for p in (ref, run):
            if p is not None and p.poll() is None:
                p.kill()
    assert re.search(r"Submitted Slurm job \d+", ref_out) and str(tmp_path / "ref" / "slurm") in ref_out
    a = train_losses(tmp_path / "ref")
    assert sorted(a) == list(range(1, 21)) and a[20] < a[1] - 0.5
    if run is None:
        pytest.skip("neox/train/worker.py does not stop on preemption yet (PreemptionWatcher not used there)")
    assert f"Slurm job {job_id} was requeued" in out
    log = (tmp_path / "usr2" / "slurm" / f"{job_id}_0_log.out").read_text()
    stopped = int(re.search(r"stopping at step (\d+) \(SIGUSR2\)", log).group(1))
    assert re.search(rf"resumed from .* at step {stopped}\b", log), log[-3000:]
    b = train_losses(tmp_path / "usr2")
    assert max(a) == max(b) == 20
    assert abs(a[20] - b[20]) <= 1e-6, (a[20], b[20])
