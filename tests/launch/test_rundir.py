"""One live run per run directory, and a launch that is refused leaves the directory as it was
(issue 13, items 2, 3, 5, 7 and their family). Lock and launcher checks run in-process; one slow
test runs two real launches into one directory and stops the first with Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from neox.checkpoint.manager import CheckpointManager
from neox.errors import LaunchError
from neox.launch.cli import main
from neox.launch.rundir import LOCK_NAME, PENDING_CONFIG, RunDirLock
from support.procs import kill_tree, master_ports, no_shm_leak
from support.runs import TINY, start, wait_for_step

HOST = socket.gethostname()

HOLDER = textwrap.dedent("""
    import sys, time
    from neox.launch.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of tmp_path/run."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, SUBMITIT_EXECUTOR="", SLURM_JOB_ID=""))
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _launch(capsys, *args: str) -> tuple:
    """`launch.py TINY ARGS` in this process: (exit status, stdout, stderr)."""
    rc = main([*TINY, "train.steps=2", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


# ------------------------------------------------------------------------------------ the lock


def test_lock_is_taken_recorded_and_removed(tmp_path):
    run = tmp_path / "run"
    with RunDirLock(run) as lock:
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["host"] == HOST and record["pid"] == os.getpid() and lock.fd is not None
        with pytest.raises(LaunchError, match=rf"run dir {run} is in use by another run \(host {HOST}, pid "
                                              rf"{os.getpid()}, since .*\): wait for it to end or stop it"):
            RunDirLock(run).acquire()  # a second open file: flock refuses it even in this process
    assert not (run / LOCK_NAME).exists()


def test_second_launch_is_refused_naming_the_holder(holder):
    run, proc = holder
    with pytest.raises(LaunchError) as err:
        RunDirLock(run).acquire()
    assert f"is in use by another run (host {HOST}, pid {proc.pid}, since " in str(err.value)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder's record is untouched


def test_stale_lock_of_a_dead_process_is_taken_over_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / LOCK_NAME).write_text(json.dumps({"host": HOST, "pid": pid, "started": "2026-01-01 00:00:00"}))
    with RunDirLock(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err == (f"neox: taking over the lock of {run} from a run that is gone (host {HOST}, pid {pid}, "
                   "since 2026-01-01 00:00:00)\n")


def test_lock_of_another_host_is_not_guessed_at(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"host": "login9", "pid": 4242, "started": "t"}))
    with pytest.raises(LaunchError, match=rf"locked by a run on another machine \(host login9, pid 4242, since t\)"
                                          rf".*if it is gone, delete {run}/{LOCK_NAME} and rerun"):
        RunDirLock(run).acquire()


@pytest.mark.parametrize("state,outcome", [("RUNNING", "refused"), ("PENDING", "refused"),
                                           ("COMPLETED", "silent"), ("", "silent"), (None, "said")])
def test_lock_handed_to_a_slurm_job_lasts_while_the_job_lives(tmp_path, capsys, state, outcome):
    """cluster=slurm: the launcher hands the lock to the job it submitted (with cluster.wait=false it
    exits at once); a later launch asks Slurm (here a stand-in) whether that job still runs."""
    run = tmp_path / "run"
    lock = RunDirLock(run).acquire()
    lock.hand_to_job("123")
    lock.release()
    assert json.loads((run / LOCK_NAME).read_text())["slurm_job"] == "123"  # kept after the launcher left
    asked = []
    later = RunDirLock(run, job_state=lambda job: asked.append(job) or state)
    if outcome == "refused":
        with pytest.raises(LaunchError, match=rf"run dir {run} belongs to Slurm job 123, which is {state} "
                                              rf"\(host {HOST}, .*\): wait for it to end or `scancel 123`"):
            later.acquire()
    else:
        later.acquire()
        later.release()
        err = capsys.readouterr().err
        assert (err == "") if outcome == "silent" else ("Slurm cannot be asked here; taking it over" in err)
    assert asked == ["123"]


def test_tasks_of_one_slurm_job_share_the_lock(tmp_path, monkeypatch):
    """hydra's submitit launcher runs the launcher code in every task of the job."""
    run = tmp_path / "run"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = RunDirLock(run).acquire()
    second = RunDirLock(run).acquire()  # another task of job 77
    assert second.shared and second.fd is None
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(LaunchError, match="Slurm job 77"):
        RunDirLock(run).acquire()
    second.release()
    assert (run / LOCK_NAME).exists()  # a sharing task does not remove the holder's lock
    first.release()


@pytest.mark.parametrize("case", ["under_a_file", "name_too_long", "dangling_symlink", "proc"])
def test_run_dir_that_cannot_be_created_is_one_line(tmp_path, case):
    if case == "under_a_file":
        (tmp_path / "f").write_text("x")
        run, said = tmp_path / "f" / "run", "cannot create the run directory .*: Not a directory"
    elif case == "name_too_long":
        run, said = tmp_path / ("x" * 300), "cannot create the run directory .*: File name too long"
    elif case == "dangling_symlink":
        run = tmp_path / "link"
        run.symlink_to(tmp_path / "nowhere")
        said = f"the run directory {run} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"
    else:
        run, said = Path("/proc/neox-test-run"), "cannot create the run directory /proc/neox-test-run: "
    with pytest.raises(LaunchError, match=said):
        RunDirLock(run).acquire()


# ------------------------------------------------------------------------------------ launch.py


def test_refused_launch_does_not_touch_the_run_dir(holder, capsys):
    """Before: the second launcher overwrote config.yaml while the first run was using it."""
    run, proc = holder
    (run / "config.yaml").write_text("the first run's config\n")
    before = _snapshot(run)
    rc, _, err = _launch(capsys, "optim.lr=0.5", f"run_dir={run}")
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"neox: error: run dir {run} is in use by another run (host {HOST}, pid {proc.pid}")
    assert _snapshot(run) == before


def _checkpointed_run(tmp_path, *overrides: str) -> Path:
    """A run dir whose checkpoint was trained with TINY + overrides (only what the launcher reads)."""
    from neox.launch.compose import compose_config

    run = tmp_path / "run"
    cfg = compose_config([*TINY, "train.steps=2", *overrides, f"run_dir={run}"])
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "neox_state.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
    (run / "checkpoints" / "latest").write_text(tag.name)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run


@pytest.mark.parametrize("dry", [False, True])
def test_refused_resume_is_refused_by_the_launcher_and_keeps_config_yaml(tmp_path, capsys, dry):
    """Before: the launcher wrote the new config.yaml, then the workers refused the shape change."""
    run = _checkpointed_run(tmp_path)
    before = _snapshot(run)
    rc, _, err = _launch(capsys, "model.n_layers=3", f"run_dir={run}", f"dry_run={str(dry).lower()}")
    assert rc == 2 and err.count("\n") == 1 and "model.n_layers 2 -> 3" in err, err
    assert _snapshot(run) == before


@pytest.mark.parametrize("case", ["checkpoints_is_a_file", "latest_is_a_directory", "keep_0",
                                  "config_is_a_directory"])
def test_run_dir_that_cannot_hold_checkpoints_is_refused_before_launching(tmp_path, capsys, case):
    run = tmp_path / "run"
    run.mkdir()
    args = [f"run_dir={run}"]
    if case == "checkpoints_is_a_file":
        (run / "checkpoints").write_text("x")
        said = "checkpoints is a file, not a directory of checkpoints"
    elif case == "latest_is_a_directory":
        (run / "checkpoints" / "latest").mkdir(parents=True)
        said = "latest is a directory"
    elif case == "keep_0":
        args.append("train.keep_checkpoints=0")
        said = "keep_checkpoints"
    else:  # before: an IsADirectoryError traceback when the launcher wrote config.yaml
        (run / "config.yaml").mkdir()
        said = f"{run}/config.yaml is a directory; the run's config is written there: move it away"
    before = _snapshot(run)
    rc, _, err = _launch(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and said in err, err
    assert _snapshot(run) == before


def test_master_port_in_use_is_said_before_launching(tmp_path, capsys):
    """Before: each rank failed after its imports with a DistNetworkError traceback."""
    run = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = _launch(capsys, f"cluster.master_port={port}", f"run_dir={run}")
    assert rc == 2 and err == (f"neox: error: cluster.master_port={port} is already in use on this machine "
                               "(another run or service listens on it): pick another port, or leave "
                               "cluster.master_port unset to use a free one\n")
    assert not run.exists()  # the run dir the launch created is removed again


def test_unusable_run_dir_is_one_line_from_launch_py(tmp_path, capsys):
    rc, _, err = _launch(capsys, f"run_dir={tmp_path / ('x' * 300)}")
    assert rc == 2 and err.startswith("neox: error: cannot create the run directory") and err.count("\n") == 1


# ------------------------------------------------------------------------------------ real runs


@pytest.mark.slow
@pytest.mark.usefixtures("embedded_ready")
def test_second_launch_is_refused_and_ctrl_c_keeps_the_last_checkpoint(tmp_path, capsys):
    """Two launches into one run dir, the first a real run: the second (in this process: it is refused
    before any worker) says so in one line without touching the first's files; then Ctrl-C (SIGINT to
    the launcher's process group, as a terminal sends it) stops the first: exit 130, what was kept and
    how to resume, no traceback from any process, no /dev/shm leftovers, no lock; the checkpoint it
    names verifies and the same command plans again."""
    run = tmp_path / "run"
    args = [*TINY, "train.steps=400", "train.save_every=2", f"run_dir={run}"]
    log = tmp_path / "first.log"
    with no_shm_leak(ports=lambda: master_ports(log.read_text())):  # its own buffers, not a concurrent test's
        first = start(args, log, new_session=True)
        try:
            wait_for_step(run, 3, first)
            config = (run / "config.yaml").read_bytes()
            capsys.readouterr()
            assert main([*args, "optim.lr=0.5"]) == 2
            assert capsys.readouterr().err == (
                f"neox: error: run dir {run} is in use by another run (host {HOST}, pid {first.pid}, since "
                f"{json.loads((run / LOCK_NAME).read_text())['started']}): wait for it to end or stop it, or "
                "choose another run_dir\n")
            assert (run / "config.yaml").read_bytes() == config
            os.killpg(first.pid, signal.SIGINT)
            assert first.wait(timeout=60) == 130
        finally:
            if first.poll() is None:
                kill_tree(first.pid)
                first.wait()
    out = log.read_text()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert out.rstrip().endswith(f"neox: interrupted: the workers are stopped; the last checkpoint is "
                                 f"{run / 'checkpoints' / latest} (step {int(latest[5:])}); rerun the same command "
                                 "to resume"), out[-2000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "collective failed" not in out, out[-3000:]
    assert not (run / LOCK_NAME).exists() and not (run / PENDING_CONFIG).exists()
    # What the rerun needs, checked in this process (a resume from a verified checkpoint is tested with
    # real runs elsewhere): the kept checkpoint verifies, the lock is free, the same command plans.
    assert CheckpointManager(run / "checkpoints", 3, is_main=True).verify(latest) is None
    RunDirLock(run).acquire().release()
    assert main([*args, "dry_run=true"]) == 0, capsys.readouterr().err
