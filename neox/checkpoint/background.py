"""Asynchronous saves: DeepSpeed's files are snapshotted into host memory during the save call and
written by a background thread, with the guarantees of a synchronous save.

In the training thread, on every rank (`CheckpointManager.save` with async_save):
    wait for this rank's previous writer; rank 0's includes the commit, and every rank passes the
    barrier below only after rank 0 did: at most one save is in flight, across all ranks
    rank 0 removes a stale <tag>.partial; barrier
    `engine.save_checkpoint` runs with `SnapshotEngine` as the engine's checkpoint engine: each file
    DeepSpeed writes is snapshotted (neox.checkpoint.snapshot) and queued; DeepSpeed's own collectives
    in that call stay in this thread
    start the writer and return to training
In the writer (a thread that runs no collective):
    write the queued files, then fsync and hash them; every rank but 0 drops its hashes (or its one-line
    error) in <tag>.partial/.writers/rank_NNNNN.json
    rank 0 waits for every rank's marker (the collective timeout bounds the wait), then commits as a
    synchronous save does: manifest, rename, `latest`, prune

A failed write is reported in the log by rank 0 in one line; the previous checkpoint stays `latest`,
training goes on and the next save starts afresh. A host without memory for the copies falls back to
writing in the training thread (`SnapshotEngine.short`), through the same protocol.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from neox.checkpoint import files as F
from neox.checkpoint.snapshot import HostMemory, HostMemoryShort, SnapshotUnsupported, snapshot
from neox.errors import CheckpointError

WRITERS = ".writers"  # inside <tag>.partial: one marker per rank; removed before the manifest is written
_POLL_S = 0.05

Digests = Dict[str, Dict[str, object]]


@dataclass
class WriteJob:
    """One rank's share of one save."""
    tag: str
    step: int
    partial: Path
    rank: int
    world: int
    writes: List[Tuple[Path, Callable[[], None]]] = field(default_factory=list)  # still to write
    written: List[Path] = field(default_factory=list)  # already on disk (written in the training thread)
    ready: Any = None  # a CUDA event: the device->host copies are done when it is
    failed: Optional[BaseException] = None  # a file written in the training thread failed
    started: float = field(default_factory=time.perf_counter)

    def add(self, path: Path, write: Callable[[], None]) -> None:
        self.writes.append((Path(path), write))

    def write_share(self) -> Digests:
        """Write the queued files; fsync and hash every file of this rank's share."""
        if self.failed is not None:
            raise self.failed
        if self.ready is not None:
            self.ready.synchronize()
        paths = list(self.written)
        for path, write in self.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            write()
            paths.append(path)
        self.writes = []  # drop the references to the host copies
        rels = sorted({p.relative_to(self.partial).as_posix() for p in paths})
        return F.digest_files(self.partial, rels, fsync=True)

    def marker(self, rank: int) -> Path:
        return self.partial / WRITERS / f"rank_{rank:05d}.json"

    def report(self, digests: Optional[Digests], error: Optional[str]) -> None:
        """A rank other than 0 tells rank 0 it is done (its hashes) or failed (one line)."""
        path = self.marker(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        F.atomic_write_text(path, json.dumps({"files": digests} if error is None else {"error": error}))

    def collect(self, timeout_s: float, abort: Optional[threading.Event] = None) -> Tuple[Digests, List[str]]:
        """Rank 0: every other rank's hashes, once all reported; and the errors they reported. `abort` set
        (the job is ending on an error, its peers may be dead) stops the wait at once."""
        digests: Digests = {}
        errors: List[str] = []
        pending = set(range(1, self.world))
        deadline = time.monotonic() + timeout_s
        while pending:
            for rank in sorted(pending):
                try:
                    got = json.loads(self.marker(rank).read_text())
                except (OSError, ValueError):
                    continue  # not there yet (written atomically: never half-read)
                pending.discard(rank)
                if "error" in got:
                    errors.append(f"rank {rank}: {got['error']}")
                else:
                    digests.update(got["files"])
            if pending and abort is not None and abort.is_set():
                errors.append(f"the job is ending on an error before rank(s) {', '.join(map(str, sorted(pending)))} "
                              "finished writing")
                break
            if pending and time.monotonic() > deadline:
                errors.append(f"rank(s) {', '.join(map(str, sorted(pending)))} did not finish writing within "
                              f"{timeout_s:g} s")
                break
            if pending:
                time.sleep(_POLL_S)
        return digests, errors


class SnapshotEngine:
    """Stands in for the engine's DeepSpeed checkpoint engine during one `save_checkpoint`: each
    `save(state_dict, path)` takes a host copy and queues its write with the engine's own `save`; the
    rest (load, makedirs, create, ...) is the engine's own. Without host memory for a copy (`short`),
    it and every later file is written at once, as DeepSpeed would have."""

    def __init__(self, inner: Any, job: WriteJob, memory: HostMemory, short: Optional[str] = None):
        self.inner, self.job, self.memory = inner, job, memory
        self.short = short  # why this rank writes in the training thread (None: in the background)
        self.unsupported: Optional[str] = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.short is None:
            try:
                copy = snapshot(state_dict, self.memory)
            except HostMemoryShort as exc:
                self.short = str(exc)
            except SnapshotUnsupported as exc:
                self.unsupported = str(exc)  # only this file: written now
            else:
                self.job.add(Path(path), lambda: self.inner.save(copy, path))
                return
        try:
            self.inner.save(state_dict, path)
        except Exception as exc:  # noqa: BLE001 - reported by the writer: DeepSpeed's collectives go on
            self.job.failed = self.job.failed or exc
            return
        self.job.written.append(Path(path))

    def commit(self, info: Any) -> bool:  # the manager commits, after the writer
        return True

    def is_decoupled(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class BackgroundSaves:
    """One rank's asynchronous saves: the writer thread (at most one), the host memory of the copies,
    and whether this rank fell back to writing in the training thread. The manager supplies the save
    call, its own files, the commit and what a failure says."""

    def __init__(self, memory: Optional[HostMemory], log: Callable[[str], None], say: Callable[[str], None]):
        self.memory = memory
        self.log, self.say = log, say  # every rank / rank 0 only
        self.thread: Optional[threading.Thread] = None
        self.preparing: Optional[threading.Thread] = None  # the host memory being allocated ahead of a save
        self.abort = threading.Event()  # set when the job ends on an error: rank 0 stops waiting for its peers
        self.short: Optional[str] = None  # why this rank writes in the training thread from now on
        self.unsupported_said = False

    def prepare(self, nbytes: int) -> None:
        """Allocate (and pin) `nbytes` of host memory for the copies in a thread, while training goes on; the
        first save then only copies (a 1.4B save stalled 7.8 s on its allocation, the next ones 1.3 s). A host
        short of memory is found out by the save itself, which says so and writes synchronously."""
        if self.preparing is not None or self.short is not None:
            return
        memory = self._memory()

        def allocate() -> None:
            try:
                memory.reserve(nbytes)
            except HostMemoryShort:
                pass  # the save meets the same shortage, and falls back with a warning

        self.preparing = threading.Thread(target=allocate, name="neox-checkpoint-memory", daemon=True)
        self.preparing.start()

    def _prepared(self) -> None:
        if self.preparing is not None:
            self.preparing.join()

    def _memory(self) -> HostMemory:
        """The arena the copies go to, made on first use (pinned on a GPU machine)."""
        if self.memory is None:
            self.memory = HostMemory(pinned=torch.cuda.is_available())
        return self.memory

    def capture(self, engine: Any, job: WriteJob, save_checkpoint: Callable[[], Any]) -> None:
        """Run DeepSpeed's save with `SnapshotEngine` as the engine's checkpoint engine."""
        self._prepared()  # the arena is this thread's from here on
        snap = SnapshotEngine(engine.checkpoint_engine, job, self._memory(), short=self.short)
        engine.checkpoint_engine = snap
        try:
            save_checkpoint()
        except BaseException:
            self.memory.reset()  # the copies taken so far go with the job
            raise
        finally:
            engine.checkpoint_engine = snap.inner
        if snap.unsupported and not self.unsupported_said:
            self.unsupported_said = True
            self.log(f"checkpoint: note (rank {job.rank}): a file holding {snap.unsupported} is written "
                     "synchronously; the others in the background")
        if snap.short is not None and self.short is None:
            self.short = snap.short
            self.log(f"checkpoint: warning (rank {job.rank}): not enough host memory for an asynchronous save "
                     f"({snap.short}); this save and the later ones are written synchronously")
        if self.memory.pinned and torch.cuda.is_available():
            job.ready = torch.cuda.Event()
            job.ready.record()  # after the device->host copies queued on this stream

    def start(self, job: WriteJob, commit: Callable[[WriteJob, Digests], None],
              failed: Callable[[WriteJob, BaseException], None], timeout_s: float) -> None:
        """Write the job in the background (or here, without host memory for the copies)."""
        if self.short is not None:
            self._write(job, commit, failed, timeout_s)
            self.memory.close()
            return
        self.thread = threading.Thread(target=self._write, args=(job, commit, failed, timeout_s),
                                       name=f"neox-checkpoint-{job.tag}")
        self.thread.start()

    def _write(self, job: WriteJob, commit: Callable[[WriteJob, Digests], None],
               failed: Callable[[WriteJob, BaseException], None], timeout_s: float) -> None:
        """This rank's files, then (rank 0) every rank's markers and the commit. Never raises: a failure
        is one line in the log (`failed`), and the previous checkpoint stays `latest`."""
        digests: Digests = {}
        error: Optional[BaseException] = None
        try:
            digests = job.write_share()
        except Exception as exc:  # noqa: BLE001 - any failure of the write is reported, not raised
            error = exc
        finally:
            job.writes = []
            self.memory.reset()
        if job.rank != 0:
            try:
                job.report(digests if error is None else None,
                           None if error is None else (str(error).splitlines() or [type(error).__name__])[0][:200])
            except OSError:
                pass  # rank 0's wait runs out and says so
            return
        try:
            others, errors = job.collect(timeout_s, self.abort)
            if error is not None:
                raise error
            if errors:
                raise CheckpointError("; ".join(errors))
            digests.update(others)
            commit(job, digests)
        except Exception as exc:  # noqa: BLE001
            failed(job, exc)
            return
        size = sum(int(d["size"]) for d in digests.values())
        how = "in the background" if self.short is None else "synchronously"
        self.say(f"{job.tag} written ({size / 2**30:.2f} GiB in {time.perf_counter() - job.started:.1f} s, {how})")

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def close(self, abort: bool = False) -> None:
        if abort:
            self.abort.set()
        self.wait()
        self._prepared()
        if self.memory is not None:
            self.memory.close()


def state_bytes(engine: Any) -> int:
    """About what a save of `engine` copies on this rank: the module's parameters, the parameters the optimizer
    steps (fp32 masters or ZeRO partitions; counted once where they are the module's own) and its state tensors
    (AdamW's two moments per stepped parameter where it has none yet)."""
    def storages(tensors: Any) -> Dict[int, int]:  # each storage once: address -> bytes
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor) and t.numel()}

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    stepped = storages(p for group in getattr(inner, "param_groups", []) for p in group["params"])
    state = storages(v for s in getattr(inner, "state", {}).values() for v in s.values())
    every = {**storages(engine.module.parameters()), **stepped, **state}
    # AdamW's two moments, not created yet where the first step was skipped (an fp16 overflow)
    return sum(every.values()) + (0 if state else 2 * sum(stepped.values()))


def resolve_async_save(setting: Optional[bool], device_type: str) -> bool:
    """train.async_save as a run uses it: unset (None) means yes on GPU, no on CPU."""
    return bool(setting) if setting is not None else device_type == "cuda"
