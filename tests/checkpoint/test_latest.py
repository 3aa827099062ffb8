"""A missing or unusable `checkpoints/latest`, and the other ways a checkpoints directory can be wrong
(issue 13, item 1 and its family). In-process, with the stand-in engine; one subprocess test mounts a
read-only file system in a private mount namespace."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fake_engine import FakeEngine
from neox.checkpoint import CheckpointManager
from neox.checkpoint.files import atomic_write_text
from neox.checkpoint.tags import read_latest
from neox.errors import CheckpointError

HERE = Path(__file__).resolve().parent
SHARD = "mp_rank_00_model_states.pt"


def _client(step):
    return {"run_state": {"step": step, "consumed_samples": 8 * step, "tokens": 512 * step, "skipped_steps": 0},
            "config": {"model": {"n_layers": 2}}}


def _run_dir_with(tmp_path, steps, keep=3, async_save=False):
    """The issue's repro: a run saved at these steps; returns its checkpoints directory."""
    d = tmp_path / "checkpoints"
    m = CheckpointManager(d, keep, True, log=lambda _: None, async_save=async_save)
    for s in steps:
        m.save(FakeEngine(float(s)), s, _client(s))
    m.close()
    return d


def _spoil_latest(d: Path, how: str) -> str:
    """Damage `latest` as users and crashes do; returns what the one-line message says about it."""
    latest = d / "latest"
    if how == "deleted":
        latest.unlink()
        return "is missing"
    if how == "empty":
        latest.write_text("")
        return "is empty"
    if how == "blank":
        latest.write_text(" \n\n")
        return "is empty"
    if how == "binary":
        latest.write_bytes(b"\x80\xff\xfe\x00step")
        return "is not text (8 bytes of binary data)"
    if how == "dangling_symlink":
        latest.unlink()
        latest.symlink_to(d / "nowhere")
        return "is unreadable (No such file or directory)"
    if how == "path":
        latest.write_text("../../etc")
        return "is not a checkpoint name ('../../etc')"
    raise AssertionError(how)


SPOILS = ["deleted", "empty", "blank", "binary", "dangling_symlink", "path"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("how", SPOILS)
def test_unusable_latest_resumes_from_the_newest_verified_checkpoint(tmp_path, how, async_save):
    """Before: `latest` deleted or empty -> a silent fresh start whose first save deleted step 4;
    binary bytes -> UnicodeDecodeError traceback."""
    d = _run_dir_with(tmp_path, [2, 4], async_save=async_save)
    said = _spoil_latest(d, how)
    msgs = []
    m = CheckpointManager(d, 3, True, log=msgs.append, async_save=async_save)
    engine = FakeEngine()
    client = m.load(engine)
    assert client is not None and client["step"] == 4 and engine.w[0] == 4.0
    assert msgs == [f"checkpoint: {d / 'latest'} {said}: resuming from the newest verified checkpoint, "
                    "step_00000004"], msgs
    # The resumed run saves later steps; nothing it had is lost.
    m.save(FakeEngine(6.0), 6, _client(6))
    m.wait()
    assert m.complete_tags() == ["step_00000002", "step_00000004", "step_00000006"]
    assert read_latest(d) == ("step_00000006", None)


def test_unusable_latest_and_a_corrupt_newest_falls_back_to_the_next(tmp_path):
    d = _run_dir_with(tmp_path, [2, 4])
    (d / "latest").unlink()
    os.truncate(d / "step_00000004" / SHARD, 7)
    msgs = []
    assert CheckpointManager(d, 3, True, log=msgs.append).load(FakeEngine())["step"] == 2
    assert len(msgs) == 2 and "step_00000004 is unusable: mp_rank_00_model_states.pt is truncated" in msgs[0]
    assert msgs[1].endswith("latest is missing: resuming from the newest verified checkpoint, step_00000002")


def test_unusable_latest_and_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    d = _run_dir_with(tmp_path, [2])
    (d / "latest").write_text("")
    os.truncate(d / "step_00000002" / SHARD, 7)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step_00000002: .* is truncated"):
        CheckpointManager(d, 3, True, log=lambda _: None).load(FakeEngine())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_never_prunes_a_checkpoint_newer_than_itself(tmp_path, async_save):
    """keep=1, and the run somehow saves step 2 beside a step 4 (e.g. `latest` pointed back by hand):
    the older rule deleted every checkpoint newer than `latest`."""
    d = _run_dir_with(tmp_path, [4], keep=1)
    m = CheckpointManager(d, 1, True, log=lambda _: None, async_save=async_save)
    m.save(FakeEngine(2.0), 2, _client(2))
    m.save(FakeEngine(3.0), 3, _client(3))
    m.wait()
    assert m.complete_tags() == ["step_00000003", "step_00000004"]
    engine = FakeEngine()
    CheckpointManager(d, 1, True, log=lambda _: None).load(engine)  # `latest` names step 3
    assert engine.w[0] == 3.0


def test_latest_naming_a_tag_of_another_format(tmp_path):
    """A plain DeepSpeed `latest` (global_step10) in a neox checkpoints dir: one line, then neox's own."""
    d = _run_dir_with(tmp_path, [2])
    (d / "global_step10").mkdir()
    torch.save({"module": {}}, d / "global_step10" / SHARD)
    atomic_write_text(d / "latest", "global_step10")
    msgs = []
    assert CheckpointManager(d, 3, True, log=msgs.append).load(FakeEngine())["step"] == 2
    assert len(msgs) == 1 and "global_step10 is unusable: it has no manifest.json" in msgs[0]
    assert "falling back to step_00000002" in msgs[0]
    CheckpointManager(d, 1, True, log=lambda _: None).save(FakeEngine(3.0), 3, _client(3))
    assert (d / "global_step10").is_dir()  # not ours: never removed


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_symlinked_checkpoint_is_loaded_and_never_deleted_through_the_link(tmp_path, async_save):
    elsewhere = _run_dir_with(tmp_path / "elsewhere", [2])
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    (d / "step_00000002").symlink_to(elsewhere / "step_00000002")
    msgs = []
    m = CheckpointManager(d, 1, True, log=msgs.append, async_save=async_save)
    assert m.load(FakeEngine())["step"] == 2 and "latest is missing" in msgs[0]
    m.save(FakeEngine(3.0), 3, _client(3))  # keep=1: the link is pruned, not what it points to
    m.wait()
    assert (elsewhere / "step_00000002" / SHARD).is_file()


def test_latest_that_is_a_directory_is_refused_before_training(tmp_path):
    """Before: treated as no checkpoint; the first save then failed on it with a message about disk space."""
    d = _run_dir_with(tmp_path, [2])
    (d / "latest").unlink()
    (d / "latest").mkdir()
    with pytest.raises(CheckpointError, match=r"latest is a directory; it must be the file naming the checkpoint"):
        CheckpointManager(d, 3, True).load(FakeEngine())


def test_checkpoints_path_that_is_a_file_is_refused_before_training(tmp_path):
    """Before: a silent fresh start; the first save then failed (FileExistsError) after the steps were spent."""
    (tmp_path / "checkpoints").write_text("oops")
    with pytest.raises(CheckpointError, match=r"checkpoints is a file, not a directory of checkpoints: move it away"):
        CheckpointManager(tmp_path / "checkpoints", 3, True).load(FakeEngine())


@pytest.mark.parametrize("keep", [0, -2])
def test_keep_checkpoints_below_one_is_an_error_not_silently_one(keep, tmp_path):
    with pytest.raises(CheckpointError, match=rf"train.keep_checkpoints={keep} must be at least 1"):
        CheckpointManager(tmp_path, keep, True)


READ_ONLY = textwrap.dedent("""
    import sys; sys.path.insert(0, {here!r})
    from pathlib import Path
    from fake_engine import FakeEngine
    from neox.checkpoint import CheckpointManager
    from neox.errors import CheckpointError
    try:
        CheckpointManager(Path({d!r}), 3, True).load(FakeEngine())
    except CheckpointError as exc:
        print("refused:", exc)
""")


def test_read_only_checkpoints_directory_is_refused_before_training(tmp_path):
    """A read-only mount (root ignores permission bits, so chmod cannot show it): mounted in a private
    mount namespace, so nothing outside this test sees it."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (a private mount namespace) to mount a read-only file system")
    d = tmp_path / "checkpoints"
    d.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(READ_ONLY.format(here=str(HERE), d=str(d)))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro,size=1m tmpfs {d} && "
                           f"{sys.executable} {script}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"refused: {d} is not writable: checkpoints could not be saved" in proc.stdout, proc.stdout
