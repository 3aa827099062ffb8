"""The bench scripts free disk by deleting what their own runs wrote, never a run dir that was there before."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _fake_launch():
    def run(cmd, **kwargs):
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")
        return subprocess.CompletedProcess(cmd, 1, "", "failed\n")
    return run


class _RunUntilStopped:
    """A stand-in for launch.py under subprocess.Popen: it logs one training step per poll and runs on
    until it is sent SIGINT (as a real run with train.steps far ahead would)."""

    def __init__(self, cmd, **kwargs):
        # a pid above Linux's largest (4,194,304): no process has it, so nothing of the machine is signalled
        self.cmd, self.returncode, self.pid, self.step = cmd, None, 4_194_305, 0
        self.run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.signals: list = []
        _RunUntilStopped.last = self

    def poll(self):
        if self.returncode is None:
            self.step += 1
            record = {"step": self.step, "train/tokens_per_s": 1000.0 * self.step, "train/memory_gb": 1.0,
                      "train/loss": 5.0}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)
        self.returncode = -sig

    def wait(self, timeout=None):
        return self.returncode

    def kill(self):
        self.signals.append(signal.SIGKILL)


def test_train_throughput_stops_each_run_after_its_last_measured_step(tmp_path, monkeypatch):
    """No run reaches its end, so none writes the final checkpoint (a 6.7B one is ~94 GB, more than the
    GPU machine's disk): train.steps lies beyond the measured steps, and the run is stopped by SIGINT
    once step `steps` is logged; only steps up to it are counted."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train_throughput as tt

    monkeypatch.setattr(tt.subprocess, "Popen", _RunUntilStopped)
    monkeypatch.setattr(tt.time, "sleep", lambda s: None)
    row = tt.neox("1.4B", [], 4, 8, 5, tmp_path, "default")
    run = _RunUntilStopped.last
    assert "train.steps=1005" in run.cmd and run.signals[0] == signal.SIGINT
    assert row["tokens_per_s"] == 4000.0  # median of steps 3..5: warm-up steps 1, 2 dropped, nothing after 5
    assert not (tmp_path / "neox-1.4B-default" / "checkpoints").exists()


def test_train_throughput_reports_a_run_that_ended_before_its_last_step(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train_throughput as tt

    def crashed(cmd, **kwargs):
        proc = _RunUntilStopped(cmd)
        proc.returncode = 1
        (proc.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/tokens_per_s": 1.0}) + "\n")
        (tmp_path / "neox-1.4B-oom.log").write_text("neox: error: CUDA out of memory\n")
        return proc

    monkeypatch.setattr(tt.subprocess, "Popen", crashed)
    row = tt.neox("1.4B", [], 4, 8, 5, tmp_path, "oom")
    assert row == {"name": "neox default", "failed": ["neox: error: CUDA out of memory"]}


def test_checkpoint_save_runs_in_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import checkpoint_save as cs

    monkeypatch.setattr(cs.subprocess, "run", _fake_launch())
    mine = tmp_path / "1.4B-sync" / "checkpoints"
    mine.mkdir(parents=True)  # a folder of the same name, not the bench's
    cs.train("1.4B", "sync", 3, 2, tmp_path, tmp_path)
    assert mine.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["1.4B-sync", "1.4B-sync.log"]


def test_gpu_queue_refuses_a_results_dir_that_holds_files(tmp_path):
    """bench/gpu_queue_2x.sh --start writes into its results dir and deletes nothing: one already in use
    (an earlier queue's results) is refused before anything starts."""
    res = tmp_path / "res"
    res.mkdir()
    (res / "queue.log").write_text("an earlier queue\n")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_queue_2x.sh"), "--start", str(res)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert sorted(p.name for p in res.iterdir()) == ["queue.log"]
    assert (res / "queue.log").read_text() == "an earlier queue\n"


def test_gpu_queue_collect_packs_only_the_small_files(tmp_path):
    """A device call brings back little: --collect packs the results' small files (logs, tables, JSON) and
    leaves traces, checkpoints and TensorBoard events on the machine."""
    import tarfile

    res = tmp_path / "res"
    (res / "run" / "tb").mkdir(parents=True)
    (res / "queue.log").write_text("12:00:00 queue done\n")
    (res / "run" / "metrics.jsonl").write_text("{}\n")
    (res / "run" / "tb" / "events").write_text("x")
    (res / "trace.json").write_bytes(b"0" * (6 * 1024 * 1024))
    (res / "DONE").touch()
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_queue_2x.sh"), "--collect", str(res), "5"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0 and "queue done" in proc.stdout, proc.stderr
    with tarfile.open(tmp_path / "res.tgz") as tar:
        assert sorted(tar.getnames()) == ["./DONE", "./queue.log", "./run/metrics.jsonl"]


def test_gpu_queue_ends_only_its_own_leftover_ranks(tmp_path):
    """The queue's last resort against ranks still holding the GPUs kills only those started from its own
    tree: a run of the same program from anywhere else on the machine lives on."""
    import sys
    import time

    mine, other = tmp_path / "queue", tmp_path / "elsewhere"
    mine.mkdir(), other.mkdir()
    script = (REPO / "bench" / "gpu_queue_2x.sh").read_text()
    (mine / "q.sh").write_text(script)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "-m", "neox.train"]
    procs = {where: subprocess.Popen(sleeper, cwd=where) for where in (mine, other)}
    try:
        time.sleep(0.5)
        subprocess.run(["bash", "q.sh", "--end-leftovers"], cwd=mine, timeout=30, check=True)
        assert procs[mine].wait(timeout=10) == -9
        time.sleep(0.5)
        assert procs[other].poll() is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
