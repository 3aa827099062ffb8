"""bench/runs.py: a bench's launch.py run stops when the bench is done with it, ranks included, even when the
bench itself was started in the background by a shell (SIGINT ignored) and the ranks sit in another session."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.procs import free_port, master_ports, no_shm_leak
from support.runs import TINY, run_env, wait_for_step

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import runs  # noqa: E402


def _ignoring_sigint(start):
    """Start a process the way the GPU queue's background shell does: with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.usefixtures("embedded_ready")
def test_a_run_started_with_sigint_ignored_stops_at_once_ranks_included(tmp_path):
    """Before: launch.py inherited the ignored SIGINT and trained on; after the bench's grace it was
    SIGKILLed alone and its two ranks (the deepspeed runner's session) trained on to train.steps."""
    run = tmp_path / "run"
    log_path = tmp_path / "run.log"
    cmd = [sys.executable, str(REPO / "launch.py"), *TINY, "train.steps=100000", "train.save_every=100000",
           f"cluster.master_port={free_port()}", f"run_dir={run}"]
    with no_shm_leak(ports=lambda: master_ports(log_path.read_text())), open(log_path, "w") as log:
        proc = _ignoring_sigint(lambda: runs.start(cmd, log, env=run_env()))
        try:
            wait_for_step(run, 2, proc)
            tree = runs.descendants(proc.pid)
            ranks = [p for p in tree if "-m neox.train" in _cmdline(p[0]) and "deepspeed" not in _cmdline(p[0])]
            assert len(ranks) == 2  # the ranks are below it (in the deepspeed runner's session)
            began = time.monotonic()
            runs.stop(proc, grace_s=60)
            took = time.monotonic() - began
        finally:
            if proc.poll() is None:
                runs.stop(proc, grace_s=1)
    assert took < 30, f"the run took {took:.0f} s to stop: SIGINT did not reach it"
    assert not [p for p in tree if runs.alive(p)]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())  # stopped, not saved
    assert "KeyboardInterrupt" not in log_path.read_text()  # the launcher's own quiet stop, no traceback


def test_stop_ends_a_descendant_that_ignores_sigint_in_a_session_of_its_own(tmp_path):
    """The launcher exits on SIGINT but a rank (its own session, SIGINT ignored) would live on: after the
    grace, stop() kills what it found below the run."""
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"],
                                start_new_session=True)
        open({str(tmp_path / 'rank.pid')!r}, "w").write(str(rank.pid))
        time.sleep(600)
    """))
    with open(tmp_path / "log", "w") as log:
        proc = runs.start([sys.executable, str(script)], log)
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "rank.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = int((tmp_path / "rank.pid").read_text())
            rank = next(p for p in runs.descendants(proc.pid) if p[0] == pid)
            assert runs.alive(rank)
            runs.stop(proc, grace_s=2)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGINT  # the launcher died of SIGINT (its grace was not used up)
    deadline = time.monotonic() + 10
    while runs.alive(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runs.alive(rank)


def test_a_pid_taken_by_another_process_is_not_killed():
    """stop() kills what it found below the run only while each pid is still that process: a pid the kernel
    handed to a new process (same number, other start time) is left alone."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = runs._start_time(other.pid)
        assert runs.alive((other.pid, started))
        assert not runs.alive((other.pid, started - 1))  # the same pid, an earlier process: not this one
    finally:
        other.kill()
        other.wait()
    assert not runs.alive((other.pid, started))


def test_a_bench_interrupted_while_its_run_trains_stops_the_run(tmp_path):
    """Ctrl-C reaches only the bench (the run has a session of its own): leaving `running` stops the run."""
    with open(tmp_path / "log", "w") as log:
        with pytest.raises(KeyboardInterrupt):
            with runs.running([sys.executable, "-c", "import time; time.sleep(600)"], log) as proc:
                raise KeyboardInterrupt
    assert proc.returncode is not None


def test_stop_refuses_a_process_every_process_descends_from():
    class Init:
        pid = 1

        def poll(self):
            return None

    with pytest.raises(ValueError, match="pid 1"):
        runs.stop(Init())


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
