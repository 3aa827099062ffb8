"""Fast, in-process checks of CheckpointManager with a stand-in engine: atomic saves, manifests,
fallback, retention, random states and safe loading."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_engine import FakeEngine, client as _client, manager as _manager
from neox.checkpoint import CheckpointManager, rng_state, set_rng_state
from neox.checkpoint.files import atomic_write_text
from neox.checkpoint.safe_load import safe_load
from neox.errors import CheckpointError, ConfigError

HERE = Path(__file__).resolve().parent
SHARD = "mp_rank_00_model_states.pt"


def _save_steps(m, steps):
    for s in steps:
        m.save(FakeEngine(float(s)), s, _client(s))
        m.wait()  # an async save's writer (a no-op for a synchronous one)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_layout_and_round_trip(tmp_path, async_save):
    m, _ = _manager(tmp_path, async_save=async_save)
    path = m.save(FakeEngine(3.0), 3, _client(3))
    m.wait()
    assert path == tmp_path / "checkpoints" / "step_00000003"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {SHARD, "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                      "neox_state.json", "rng/rank_00000.pt"}
    assert manifest["step"] == 3
    assert manifest["layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "partition": "compute",
                                  "parts": [0, 5]}
    assert manifest["model"]["n_layers"] == 2 and manifest["model"]["vocab_size"] == 64
    engine = FakeEngine()
    client = m.load(engine)
    assert torch.equal(engine.w, torch.full((4,), 3.0))
    assert client["run_state"] == _client(3)["run_state"] and client["step"] == 3
    assert m.loaded_tag == "step_00000003"
    assert m.read_state("step_00000003")["config"] == _client(3)["config"]


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    m, _ = _manager(tmp_path)
    assert m.load(FakeEngine()) is None
    assert m.latest_tag() is None


def test_every_random_state_is_restored(tmp_path):
    m, _ = _manager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    m.save(FakeEngine(), 1, _client(1))
    want = (random.random(), np.random.rand(), torch.rand(2), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    m.load(FakeEngine())
    got = (random.random(), np.random.rand(), torch.rand(2), np.random.randn())
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2]) and got[3] == want[3]


def test_rng_state_loads_weights_only(tmp_path):
    np.random.randn()  # a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    set_rng_state(state)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_keeps_the_last_n(tmp_path, async_save):
    m, _ = _manager(tmp_path, keep=2, async_save=async_save)
    _save_steps(m, [1, 2, 3, 4])
    assert m.complete_tags() == ["step_00000003", "step_00000004"]
    assert m.latest_tag() == "step_00000004"


@pytest.mark.parametrize("damage,expect", [
    ("truncate", "mp_rank_00_model_states.pt is truncated: "),
    ("flip", "mp_rank_00_model_states.pt is corrupt: sha256 "),
    ("delete", "mp_rank_00_model_states.pt is missing"),
    ("extend", "mp_rank_00_model_states.pt is too long"),
    ("manifest_garbage", "manifest.json is unreadable"),
    ("manifest_missing", "it has no manifest.json"),
    ("rng_truncate", "rng/rank_00000.pt is truncated"),
    ("dir_missing", "it does not exist"),
])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_damaged_latest_falls_back_with_one_line(tmp_path, damage, expect, async_save):
    m, msgs = _manager(tmp_path, async_save=async_save)
    _save_steps(m, [1, 2])
    msgs.clear()  # an async save says when its writer is done
    d = tmp_path / "checkpoints" / "step_00000002"
    shard = d / SHARD
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    elif damage == "extend":
        with open(shard, "ab") as f:
            f.write(b"\0")
    elif damage == "manifest_garbage":
        (d / "manifest.json").write_text("{not json")
    elif damage == "manifest_missing":
        (d / "manifest.json").unlink()
    elif damage == "rng_truncate":
        os.truncate(d / "rng" / "rank_00000.pt", 10)
    elif damage == "dir_missing":
        import shutil
        shutil.rmtree(d)
    engine = FakeEngine()
    client = m.load(engine)
    assert client["run_state"]["step"] == 1 and torch.equal(engine.w, torch.full((4,), 1.0))
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "step_00000002 is unusable: " in msgs[0] and expect in msgs[0] and "falling back to step_00000001" in msgs[0]


def test_latest_pointing_at_garbage_falls_back(tmp_path):
    m, msgs = _manager(tmp_path)
    _save_steps(m, [1, 2])
    atomic_write_text(tmp_path / "checkpoints" / "latest", "nonsense")
    assert m.load(FakeEngine())["step"] == 2
    assert "nonsense is unusable: it does not exist" in msgs[0]


def test_all_checkpoints_bad_is_an_error_not_a_fresh_start(tmp_path):
    m, _ = _manager(tmp_path)
    _save_steps(m, [1, 2])
    for s in (1, 2):
        os.truncate(tmp_path / "checkpoints" / f"step_{s:08d}" / SHARD, 5)
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*move the directory away"):
        m.load(FakeEngine())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_over_an_unusable_checkpoint_of_the_same_step(tmp_path, async_save):
    m, _ = _manager(tmp_path, async_save=async_save)
    _save_steps(m, [1, 2])
    os.truncate(tmp_path / "checkpoints" / "step_00000002" / SHARD, 5)
    assert m.load(FakeEngine())["step"] == 1
    m.save(FakeEngine(22.0), 2, _client(2))  # the resumed run reaches step 2 again
    engine = FakeEngine()
    assert m.load(engine)["step"] == 2 and engine.w[0] == 22.0
    assert not list((tmp_path / "checkpoints").glob("*.replaced"))


def test_save_failure_is_one_line_and_keeps_latest(tmp_path):
    m, _ = _manager(tmp_path)
    _save_steps(m, [1])

    class Full(FakeEngine):
        def save_checkpoint(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device.*step_00000001. is still the latest"):
        m.save(Full(), 2, _client(2))
    assert m.load(FakeEngine())["step"] == 1


def test_a_full_disk_inside_torch_save_is_a_checkpoint_error(tmp_path):
    """torch.save reports a short write as a RuntimeError from its zip writer (seen on a full 64 GB disk
    after a few 1.4B checkpoints); it must read as a failed save, name the free space, remove the partial
    directory and leave the previous checkpoint as the latest, not pass for a failed collective."""
    m, _ = _manager(tmp_path)
    _save_steps(m, [1])

    class ShortWrite(FakeEngine):
        def save_checkpoint(self, save_dir, tag, **k):
            Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
            Path(save_dir, tag, SHARD).write_bytes(b"half a shard")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9156624960 vs 9156624860")

    with pytest.raises(CheckpointError, match=r"step_00000002 failed: \[enforce fail.*unexpected pos .*GiB free on "
                                              r"that file system\); the previous checkpoint \(step_00000001\)"):
        m.save(ShortWrite(), 2, _client(2))
    assert not list((tmp_path / "checkpoints").glob("*partial*"))
    assert m.load(FakeEngine())["step"] == 1

    class CollectiveDied(FakeEngine):
        def save_checkpoint(self, *a, **k):
            raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # left to the worker's diagnosis
        m.save(CollectiveDied(), 2, _client(2))


CRASH = textwrap.dedent("""
    import sys; sys.path.insert(0, {here!r})
    from pathlib import Path
    from fake_engine import FakeEngine, client as _client, manager as _manager
    from neox.checkpoint import CheckpointManager
    from neox.train.faults import Faults
    m = CheckpointManager(Path({d!r}), 3, True, fault=Faults.from_env({{"NEOX_CHECKPOINT_FAULT": {spec!r}}}).checkpoint,
                          async_save={async_save})
    m.save(FakeEngine(1.0), 1, {{"run_state": {{"step": 1}}}})
    engine = FakeEngine(2.0)
    m.save(engine, 2, {{"run_state": {{"step": 2}}}})  # the fault kills us here (async: in the writer)
    engine.w.add_(1.0)  # training goes on while an async save is written
    m.wait()
    print("survived")
""")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_calls_its_fault_at_the_named_points_and_never_reads_the_environment(tmp_path, monkeypatch,
                                                                                  async_save):
    """Before: the manager read NEOX_CHECKPOINT_FAULT itself on every save (a test seam inside the
    production path); now the worker parses it once and passes the manager a callback."""
    from neox.checkpoint.faults import FAULT_POINTS

    monkeypatch.setenv("NEOX_CHECKPOINT_FAULT", "after_shards@1")  # ignored: only `fault` is called
    calls = []
    m = CheckpointManager(tmp_path / "checkpoints", 3, True, fault=lambda point, step: calls.append((point, step)),
                          async_save=async_save)
    m.save(FakeEngine(1.0), 1, _client(1))
    m.save(FakeEngine(2.0), 2, _client(2))
    m.wait()
    assert calls == [(p, s) for s in (1, 2) for p in FAULT_POINTS]


def test_the_checkpoint_fault_is_parsed_with_the_others_and_a_bad_spec_is_one_line():
    from neox.train.faults import Faults

    assert Faults.from_env({}).checkpoint is None
    assert callable(Faults.from_env({"NEOX_CHECKPOINT_FAULT": "before_rename@3"}).checkpoint)
    for spec in ("after_shards", "nowhere@2", "before_latest@x"):
        with pytest.raises(ConfigError, match=r"NEOX_CHECKPOINT_FAULT=.*: use <point>@<step> with a point among "
                                              r"after_shards, before_rename, before_latest$"):
            Faults.from_env({"NEOX_CHECKPOINT_FAULT": spec})


@pytest.mark.parametrize("point,async_save", [("after_shards", False), ("before_rename", False),
                                              ("before_latest", False), ("after_shards", True)],
                         ids=["after_shards", "before_rename", "before_latest", "after_shards-async"])
def test_kill9_during_save_leaves_previous_latest(tmp_path, point, async_save):
    """Async: rank 0 is killed inside the background writer (its files written, no manifest yet) while
    training has gone on; the later points run the commit that sync and async saves share."""
    d = tmp_path / "checkpoints"
    script = CRASH.format(here=str(HERE), d=str(d), spec=f"{point}@2", async_save=async_save)
    proc = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr[-2000:]
    m, msgs = _manager(tmp_path)
    assert m.latest_tag() == "step_00000001"
    engine = FakeEngine()
    assert m.load(engine)["run_state"]["step"] == 1 and engine.w[0] == 1.0
    # The unfinished step 2 is never considered. The complete but uncommitted one (killed after the
    # rename, before `latest` moved) is not loaded either, but it is no longer silently doomed: it is
    # kept (pruning never removes a checkpoint newer than the one being written) and said so.
    if point == "before_latest":
        assert len(msgs) == 1 and "step_00000002, newer than step_00000001 (which `latest` names), is kept " \
            "but not used" in msgs[0], msgs
    else:
        assert msgs == []
    m.save(FakeEngine(2.0), 2, {"run_state": {"step": 2}})  # the resumed run saves step 2 again
    engine = FakeEngine()
    assert m.load(engine)["run_state"]["step"] == 2 and engine.w[0] == 2.0  # the values at the save
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000001", "step_00000002"]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/neox_ckpt_exploit_marker"


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    m, _ = _manager(tmp_path)
    _save_steps(m, [1])
    d = tmp_path / "checkpoints" / "step_00000001"
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    torch.save({"module": {"w": torch.zeros(4)}, "evil": Exploit()}, d / SHARD)
    # an attacker who also rewrites the manifest gets past the checksums, but not the unpickler
    from neox.checkpoint.files import digest_files, list_files, write_manifest
    write_manifest(d, digest_files(d, list_files(d)), {"tag": d.name, "step": 1})
    with pytest.raises(CheckpointError, match="refusing to load: the file holds pickled objects.*posix.system"):
        m.load(FakeEngine())
    assert not os.path.exists(MARKER)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_load(d / SHARD)
    assert not os.path.exists(MARKER)


def test_garbage_shard_with_matching_manifest_is_one_line(tmp_path):
    m, _ = _manager(tmp_path)
    _save_steps(m, [1])
    d = tmp_path / "checkpoints" / "step_00000001"
    (d / SHARD).write_bytes(b"this is not a torch file")
    from neox.checkpoint.files import digest_files, list_files, write_manifest
    write_manifest(d, digest_files(d, list_files(d)), {"tag": d.name, "step": 1})
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: unreadable"):
        m.load(FakeEngine())


def test_shape_change_is_checked_before_any_tensor_is_read(tmp_path):
    m, msgs = _manager(tmp_path)
    _save_steps(m, [1])
    current = {"model": {"n_layers": 4}, "optim": {"lr": 1e-3}}
    with pytest.raises(CheckpointError, match="model.n_layers 2 -> 4"):
        m.load(FakeEngine(), current_config=current)
    client = m.load(FakeEngine(), current_config={"model": {"n_layers": 2}, "optim": {"lr": 5e-4}})
    assert client["step"] == 1
    assert any("optim.lr changed from 0.001 to 0.0005" in s for s in msgs)



@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_checkpoints_newer_than_latest_are_kept_until_the_run_saves_that_step_again(tmp_path, async_save):
    """`latest` pointed back (a crash before it moved, or on purpose): the run resumes from it and
    says that newer ones exist; no save removes a checkpoint newer than the one it writes (the old
    rule pruned 2 and 3 here, and would have destroyed any newer run's work the same way)."""
    m, msgs = _manager(tmp_path, keep=1, async_save=async_save)
    _save_steps(m, [1, 2, 3])
    assert m.complete_tags() == ["step_00000003"]
    _save_steps(CheckpointManager(tmp_path / "checkpoints", 3, True, log=lambda _: None), [1, 2])
    msgs.clear()
    atomic_write_text(tmp_path / "checkpoints" / "latest", "step_00000001")
    assert m.load(FakeEngine())["step"] == 1
    assert len(msgs) == 1 and "step_00000002, step_00000003, newer than step_00000001" in msgs[0], msgs
    m.save(FakeEngine(22.0), 2, _client(2))  # keep=1: step 1 goes, 3 is newer and stays
    m.wait()
    assert m.complete_tags() == ["step_00000002", "step_00000003"]
    engine = FakeEngine()
    assert m.load(engine)["step"] == 2 and engine.w[0] == 22.0  # the rewritten step 2
    m.save(FakeEngine(33.0), 3, _client(3))  # the run reaches 3 again: that one is replaced
    m.wait()
    engine = FakeEngine()
    assert m.complete_tags() == ["step_00000003"] and m.load(engine)["step"] == 3 and engine.w[0] == 33.0
