"""Asynchronous saves (train.async_save), in-process with the stand-in engine: the save returns once the
state is copied, the background writer keeps every guarantee of a synchronous save, at most one save is
in flight, and a failed write (a full disk, no host memory for the copy) is one line and not the end of
the run. The resume from a real multi-process async run is in test_async_resume.py."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from fake_engine import FakeEngine, UnsafeTorchEngine, client, manager
from neox.checkpoint import CheckpointManager
from neox.checkpoint.background import WRITERS, WriteJob
from neox.checkpoint.snapshot import HostMemory
from neox.errors import CheckpointError

SHARD = "mp_rank_00_model_states.pt"


class GatedTorchEngine(UnsafeTorchEngine):
    """Writes only once `gate` is set; counts the writes running at once and the threads they run in."""

    def __init__(self):
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.threads = set()

    def save(self, state_dict, path):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            assert self.gate.wait(60), "the test never opened the gate"
            super().save(state_dict, path)
        finally:
            with self.lock:
                self.running -= 1


def gated(value: float, inner: GatedTorchEngine) -> FakeEngine:
    engine = FakeEngine(value)
    engine.checkpoint_engine = inner
    return engine


def manifest_files(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["files"]


def test_an_async_save_returns_before_the_write_and_keeps_the_values_of_its_step(tmp_path):
    """Training goes on (the weights change in place) while the writer is held: the checkpoint holds
    the values at the save, `latest` moves only when it is complete, and the files are byte for byte
    those a synchronous save writes (same manifest hashes)."""
    m, msgs = manager(tmp_path / "async", async_save=True)
    m.save(FakeEngine(1.0), 1, client(1))
    m.wait()
    inner = GatedTorchEngine()
    engine = gated(2.0, inner)
    path = m.save(engine, 2, client(2))
    assert path == tmp_path / "async" / "checkpoints" / "step_00000002"
    assert m.latest_tag() == "step_00000001" and not path.exists()  # nothing written yet
    engine.w.add_(100.0)  # the next optimizer step, in place
    inner.gate.set()
    m.wait()
    assert m.latest_tag() == "step_00000002"
    assert inner.threads == {"neox-checkpoint-step_00000002"}  # written by the writer, not by training
    loaded = FakeEngine()
    assert m.load(loaded)["step"] == 2 and torch.equal(loaded.w, torch.full((4,), 2.0))
    assert msgs[-1].startswith("checkpoint: step_00000002 written (") and msgs[-1].endswith(" in the background)")

    sync, _ = manager(tmp_path / "sync")
    sync.save(FakeEngine(1.0), 1, client(1))
    sync_path = sync.save(FakeEngine(2.0), 2, client(2))
    assert manifest_files(path) == manifest_files(sync_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step_00000001", "step_00000002"]


def test_at_most_one_save_in_flight(tmp_path):
    """A second save waits for the first writer: never two writes at once, and the second is committed
    after the first."""
    m, _ = manager(tmp_path, async_save=True)
    inner = GatedTorchEngine()
    m.save(gated(1.0, inner), 1, client(1))
    second = threading.Thread(target=m.save, args=(gated(2.0, inner), 2, client(2)))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second save did not wait for the first writer"
    assert not (tmp_path / "checkpoints" / "step_00000002.partial").exists()
    inner.gate.set()
    second.join(60)
    m.wait()
    assert inner.most == 1 and m.latest_tag() == "step_00000002"
    assert m.complete_tags() == ["step_00000001", "step_00000002"]


class FullDisk(UnsafeTorchEngine):
    """The file system fills up under the writer: a short write in torch.save's zip writer, or ENOSPC."""

    def __init__(self, exc):
        self.exc = exc

    def save(self, state_dict, path):
        Path(path).write_bytes(b"half a shard")
        raise self.exc


@pytest.mark.parametrize("exc", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9156624960 vs 9156624860"),
], ids=["enospc", "torch_zip_writer"])
def test_a_disk_that_fills_during_the_background_write(tmp_path, exc):
    """One line naming the free space; the previous checkpoint stays `latest`; the partial directory is
    removed; training goes on (save() returned) and the next save retries and succeeds."""
    m, msgs = manager(tmp_path, async_save=True)
    m.save(FakeEngine(1.0), 1, client(1))
    full = FakeEngine(2.0)
    full.checkpoint_engine = FullDisk(exc)
    m.save(full, 2, client(2))  # returns: the failure is the writer's
    m.wait()
    failure = [x for x in msgs if "failed" in x]
    assert len(failure) == 1 and "\n" not in failure[0], msgs
    assert failure[0].startswith(f"checkpoint: saving {tmp_path / 'checkpoints' / 'step_00000002'} failed: ")
    assert str(exc).splitlines()[0][:60] in failure[0]
    assert failure[0].endswith("GiB free on that file system); the previous checkpoint (step_00000001) is still "
                               "the latest; training goes on, and the next save retries"), failure[0]
    assert m.latest_tag() == "step_00000001" and not list((tmp_path / "checkpoints").glob("*.partial"))
    # a job that ended (or stopped for a requeue) here would say it saved: it must fail as a synchronous save does
    with pytest.raises(CheckpointError, match=r"saving .*step_00000002 failed: .* is still the latest$"):
        m.wait_saved()
    m.save(FakeEngine(3.0), 3, client(3))
    m.wait_saved()  # the retry succeeded: nothing to report
    loaded = FakeEngine()
    assert m.load(loaded)["step"] == 3 and loaded.w[0] == 3.0
    assert m.complete_tags() == ["step_00000001", "step_00000003"]


def test_a_host_without_memory_for_the_copy_warns_once_and_saves_synchronously(tmp_path):
    msgs = []
    memory = HostMemory(pinned=False, available=lambda: 1 << 20)  # 1 MiB free: under the reserve
    m = CheckpointManager(tmp_path / "checkpoints", 3, True, log=msgs.append, async_save=True, host_memory=memory)
    for step in (1, 2):
        inner = GatedTorchEngine()
        inner.gate.set()
        m.save(gated(float(step), inner), step, client(step))
        # written before save() returned, in the training thread
        assert inner.threads == {threading.current_thread().name}
        assert m.latest_tag() == f"step_{step:08d}"
    warnings = [x for x in msgs if "warning" in x]
    assert warnings == ["checkpoint: warning (rank 0): not enough host memory for an asynchronous save (0.2 GiB "
                        "more host memory needed (after 0.0 GiB), 0.0 GiB available); this save and the later ones "
                        "are written synchronously"], msgs
    assert memory.allocated == 0
    loaded = FakeEngine()
    assert m.load(loaded)["step"] == 2 and loaded.w[0] == 2.0
    assert m.verify("step_00000002") is None


def test_rank_zero_commits_only_once_every_rank_reported(tmp_path):
    """The markers that replace the synchronous path's barriers: rank 0 collects every rank's hashes;
    a rank's failure, or a rank that never reports, is one line."""
    partial = tmp_path / "step_00000002.partial"
    jobs = [WriteJob("step_00000002", 2, partial, rank, 3) for rank in range(3)]
    jobs[1].report({"a.pt": {"size": 1, "sha256": "x"}}, None)
    digests, errors = jobs[0].collect(timeout_s=0.2)
    assert digests == {"a.pt": {"size": 1, "sha256": "x"}}
    assert errors == ["rank(s) 2 did not finish writing within 0.2 s"]
    jobs[2].report(None, "[Errno 28] No space left on device")
    digests, errors = jobs[0].collect(timeout_s=0.2)
    assert errors == ["rank 2: [Errno 28] No space left on device"]
    assert sorted(p.name for p in (partial / WRITERS).iterdir()) == ["rank_00001.json", "rank_00002.json"]


def test_a_job_ending_on_an_error_stops_rank_zero_waiting_for_its_peers(tmp_path):
    """The worker closes the manager with abort=True on an error: peers that died never write their marker,
    and rank 0 must not sit out the collective timeout before the error is printed."""
    partial = tmp_path / "step_00000004.partial"
    rank0 = WriteJob("step_00000004", 4, partial, 0, 2)
    abort = threading.Event()
    abort.set()
    t0 = time.monotonic()
    digests, errors = rank0.collect(timeout_s=600, abort=abort)
    assert time.monotonic() - t0 < 5 and digests == {}
    assert errors == ["the job is ending on an error before rank(s) 1 finished writing"]


def test_the_job_end_waits_for_the_writer(tmp_path):
    """close() (what the worker calls as the job ends, on every path) returns after the commit."""
    m, _ = manager(tmp_path, async_save=True)
    inner = GatedTorchEngine()
    m.save(gated(1.0, inner), 1, client(1))
    closer = threading.Thread(target=m.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and m.latest_tag() is None
    inner.gate.set()
    closer.join(60)
    assert not closer.is_alive() and m.latest_tag() == "step_00000001"


class Subclass(torch.Tensor):
    """A tensor subclass (as a quantized or distributed tensor would be): no faithful host copy."""


def test_a_tensor_subclass_is_written_synchronously_with_one_note(tmp_path):
    class Odd(FakeEngine):
        def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
            d = Path(save_dir) / tag
            d.mkdir(parents=True, exist_ok=True)
            self.checkpoint_engine.save({"module": {"w": self.w.as_subclass(Subclass)}, **client_state},
                                        str(d / SHARD))
            self.checkpoint_engine.save({"optimizer": {"m": self.w * 2}}, str(d / "optim.pt"))

    m, msgs = manager(tmp_path, async_save=True)
    inner = GatedTorchEngine()
    inner.gate.set()
    for step in (1, 2):
        engine = Odd(float(step))
        engine.checkpoint_engine = inner
        m.save(engine, step, client(step))
        m.wait()
    notes = [x for x in msgs if "note" in x]
    assert notes == ["checkpoint: note (rank 0): a file holding a Subclass (torch.strided) tensor is written "
                     "synchronously; the others in the background"], msgs
    assert inner.threads == {threading.current_thread().name, "neox-checkpoint-step_00000001",
                             "neox-checkpoint-step_00000002"}
    assert m.latest_tag() == "step_00000002" and m.verify("step_00000002") is None


def test_a_snapshot_saves_the_bytes_of_the_live_state_and_none_of_its_later_changes():
    """torch.save of the snapshot is byte for byte torch.save of the live tree (storages shared by views
    stay shared, a module state_dict keeps its _metadata), and stays so after the tree changes in place;
    the second snapshot reuses the first one's host memory."""
    import io

    from neox.checkpoint.snapshot import snapshot

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    flat = torch.randn(100)
    tree = {"module": model.state_dict(), "optimizer": opt.state_dict(), "size": torch.Size([3, 4]), "tag": "x",
            "views": [flat[:10], flat[50:], flat.view(10, 10)[2]], "groups": [[1, 2], (3, None)]}

    def saved(x) -> bytes:
        buf = io.BytesIO()
        torch.save(x, buf)
        return buf.getvalue()

    memory = HostMemory(pinned=False)
    before = saved(tree)
    snap = snapshot(tree, memory)
    assert saved(snap) == before
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        flat.add_(1.0)
    tree["groups"][0].append(9)
    assert saved(snap) == before and saved(tree) != before
    allocated = memory.allocated
    memory.reset()
    assert saved(snapshot(tree, memory)) == saved(tree) and memory.allocated == allocated
