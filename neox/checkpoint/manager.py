"""Save and resume through the DeepSpeed engine: atomically, verified, keeping the last N.

Layout of `<run_dir>/checkpoints`:

    latest                     the tag to resume from; replaced atomically, and only after the
                               checkpoint it names is complete (DeepSpeed's own `latest` is off)
    step_00000100/             one complete checkpoint
        mp_rank_00_model_states.pt, zero_*...   DeepSpeed's files (model, optimizer, lr schedule, counters,
                                                neox's client state: run state + resolved config)
        rng/rank_00000.pt      every random state of each rank (weights_only tensors)
        neox_state.json        the client state as JSON (run state, config): read before any tensor
        manifest.json          size and sha256 of every file above, the model and layout it was
                               written under (`ModelLayout.record()`); written last
    step_00000200.partial/     a save in progress (or interrupted): never loaded, removed later

A save: all ranks write into `<tag>.partial`; each rank fsyncs and hashes its share of the files;
rank 0 writes the manifest, renames the directory to `<tag>`, then moves `latest`. A crash at any
moment leaves the previous `latest` pointing at a complete checkpoint. With `async_save` the files are
copied into host memory and written by a background thread, each rank's hashes handed to rank 0
through a marker file instead of a collective (`neox.checkpoint.background`); the commit is the same.

A load: the checkpoint named by `latest` is verified against its manifest (sizes on every rank, the
hashes split across ranks); a missing, truncated or corrupt one is reported in one line and the
previous checkpoint is tried instead. Without a usable `latest` (deleted, empty, binary) every
complete checkpoint is a candidate, newest first: each is complete by construction (the manifest is
written before the rename), so the newest that verifies is as good as a committed one. A complete
checkpoint newer than a usable `latest` (a crash before `latest` moved, or `latest` pointed back on
purpose) is not loaded, and never pruned: retention only removes checkpoints older than the one
just written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from neox.checkpoint import files as F, ranks
from neox.checkpoint.background import WRITERS, BackgroundSaves, WriteJob, state_bytes
from neox.checkpoint.config_check import check_resume_config
from neox.checkpoint.faults import Fault
from neox.checkpoint.reshard import load_across_layouts
from neox.checkpoint.rng import rng_state, set_rng_state
from neox.checkpoint.safe_load import safe_engine_loads, safe_load
from neox.checkpoint.snapshot import HostMemory
from neox.checkpoint.saved import STATE_JSON, describe, jsonable, layout_changed, saved_layout
from neox.checkpoint.tags import PARTIAL, TAG_PREFIX, read_latest, step_of, tag_for
from neox.errors import CheckpointError
from neox.parallel.model_layout import ModelLayout, Parallelism

RNG_DIR = "rng"


class CheckpointManager:
    """Checkpoints of one run. `layout`: the run's model and layout, recorded in every manifest and
    compared with a checkpoint's on load (a change goes through `neox.checkpoint.reshard`); `tp_rank`:
    this rank's tensor rank in it. Without a layout (tools that only read or list checkpoints)
    nothing is recorded and a checkpoint is loaded as it is. `fault`: a test seam called as
    fault(point, step) at the named points of every save (`neox.checkpoint.faults`).

    `async_save`: a save snapshots the state into host memory and returns; a background thread writes
    it (`neox.checkpoint.background`), and `wait()` returns once it is done: a job calls it before it
    ends. `commit_timeout_s` bounds how long rank 0's writer waits for the other ranks' files.
    `host_memory`: where the snapshots go (default: pinned when CUDA is there, else plain)."""

    def __init__(self, directory: Path, keep: int, is_main: bool, log: Optional[Callable[[str], None]] = None,
                 layout: Optional[ModelLayout] = None, tp_rank: int = 0, fault: Optional[Fault] = None,
                 async_save: bool = False, commit_timeout_s: float = 600.0, host_memory: Optional[HostMemory] = None):
        if keep < 1:
            raise CheckpointError(f"train.keep_checkpoints={keep} must be at least 1 (the checkpoints kept on disk)")
        self.directory = Path(directory)
        self.keep = keep
        self.is_main = is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.layout, self.tp_rank = layout, tp_rank
        self.fault: Fault = fault or (lambda point, step: None)
        self.loaded_tag: Optional[str] = None
        self.warnings: List[str] = []
        self.async_save, self.commit_timeout_s = async_save, commit_timeout_s
        self._async = BackgroundSaves(host_memory, self.log, self.say)
        self.last_failure: Optional[str] = None  # rank 0: why the last background save failed, until one succeeds

    def say(self, msg: str) -> None:
        if self.is_main:
            self.log(f"checkpoint: {msg}")

    # ------------------------------------------------------------------------------------ queries
    def latest_tag(self) -> Optional[str]:
        """The tag `latest` names (None without a usable one). The tag may be unusable: `load` checks it."""
        return read_latest(self.directory)[0]

    def complete_tags(self) -> List[str]:
        """Finished checkpoints (final name, not .partial), oldest first."""
        if not os.path.isdir(self.directory):
            return []
        try:
            tags = [p.name for p in self.directory.iterdir() if p.is_dir() and step_of(p.name) is not None]
        except OSError as exc:
            raise CheckpointError(f"cannot list {self.directory}: {exc.strerror or exc}") from None
        return sorted(tags, key=step_of)

    def candidates(self) -> List[str]:
        """What load tries, in order: `latest`, then every older checkpoint, newest first; without a
        usable `latest`, every complete checkpoint, newest first."""
        latest = self.latest_tag()
        tags = self.complete_tags()
        if latest is None:
            return list(reversed(tags))
        bound = step_of(latest)
        older = [t for t in reversed(tags) if t != latest and (bound is None or step_of(t) < bound)]
        return [latest] + older

    def check_usable(self) -> None:
        """Raise CheckpointError (one line) if checkpoints could not be written here: the path is a
        file, `latest` is a directory, or the file system refuses writes."""
        d = self.directory
        if os.path.exists(d) and not os.path.isdir(d):
            raise CheckpointError(f"{d} is a file, not a directory of checkpoints: move it away and rerun")
        if os.path.isdir(d / "latest"):
            raise CheckpointError(f"{d / 'latest'} is a directory; it must be the file naming the checkpoint "
                                  "to resume from: remove it and rerun (the newest verified checkpoint is used)")
        if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
            raise CheckpointError(f"{d} is not writable: checkpoints could not be saved; fix its permissions "
                                  "(or the mount) and rerun")

    # ------------------------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: Dict[str, Any]) -> Path:
        """Save (collective); with async_save, return once the state is copied to host memory."""
        try:
            if self.async_save:
                return self._save_async(engine, step, client_state)
            return self._save(engine, step, client_state)
        except (OSError, RuntimeError) as exc:
            # torch.save reports a failed write (a full disk, a quota) as a RuntimeError from its zip
            # writer, e.g. "[enforce fail at inline_container.cc:672] . unexpected pos 9156624960 vs ..."
            if isinstance(exc, RuntimeError) and not F.is_write_failure(exc):
                raise  # e.g. a collective that failed inside DeepSpeed's save: the worker reports it
            if ranks.world()[0] == 0:
                shutil.rmtree(self.directory / f"{tag_for(step)}{PARTIAL}", ignore_errors=True)  # the space back
            raise CheckpointError(self._failure(step, exc)) from None

    def _failure(self, step: int, exc: BaseException) -> str:
        """One line: which save failed, why, the free space, and what is still the latest."""
        cause = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        where, free = self.directory / tag_for(step), F.free_space(self.directory)
        return (f"saving {where} failed: {cause} ({free}); the previous checkpoint "
                f"({self.latest_tag() or 'none'}) is still the latest")

    def _begin(self, step: int) -> Tuple[str, Path, Path]:
        """Every save: (tag, final dir, partial dir); rank 0 clears a stale partial dir before any rank writes."""
        tag = tag_for(step)
        final, partial = self.directory / tag, self.directory / f"{tag}{PARTIAL}"
        if ranks.world()[0] == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        ranks.barrier()
        return tag, final, partial

    def _save(self, engine, step: int, client_state: Dict[str, Any]) -> Path:
        tag, final, partial = self._begin(step)
        rank, world = ranks.world()
        client_state = {**client_state, "step": step}
        engine.save_checkpoint(str(self.directory), tag=partial.name, client_state=client_state, save_latest=False)
        (partial / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), partial / RNG_DIR / f"rank_{rank:05d}.pt")
        if rank == 0:
            F.atomic_write_text(partial / STATE_JSON, json.dumps(jsonable(client_state), indent=1, sort_keys=True))
        ranks.barrier()
        self.fault("after_shards", step)

        # every rank fsyncs and hashes its share of the files
        rels = ranks.broadcast(F.list_files(partial) if rank == 0 else None)
        mine = F.digest_files(partial, rels[rank::world], fsync=True)
        digests: Dict[str, Dict[str, object]] = {}
        for part in ranks.gather(mine):
            digests.update(part)

        if rank == 0:
            self._commit(tag, step, digests)
        ranks.barrier()
        return final

    def _commit(self, tag: str, step: int, digests: Dict[str, Dict[str, object]]) -> None:
        """Rank 0, once every rank's files are on disk with their hashes: the manifest, the rename, then
        `latest`, then retention. A file no rank hashed (written outside the ranks' shares) is hashed here."""
        final, partial = self.directory / tag, self.directory / f"{tag}{PARTIAL}"
        gone = sorted(r for r in digests if not (partial / r).is_file())  # a stat: fresh on network file systems
        if gone:
            raise CheckpointError(f"{partial / gone[0]} was written, then disappeared")
        digests.update(F.digest_files(partial, [r for r in F.list_files(partial) if r not in digests], fsync=True))
        rels = sorted(digests)
        recorded = self.layout.record() if self.layout is not None else {}
        F.write_manifest(partial, digests, {"tag": tag, "step": step, **recorded,
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for sub in {partial / os.path.dirname(r) for r in rels} | {partial}:
            F.fsync_dir(sub)
        self.fault("before_rename", step)
        replaced = None
        if final.exists():  # an unusable checkpoint of the same step (e.g. after a fallback)
            replaced = self.directory / f"{tag}.replaced"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(partial, final)
        F.fsync_dir(self.directory)
        self.fault("before_latest", step)
        F.atomic_write_text(self.directory / "latest", tag)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune(tag)

    # ------------------------------------------------------------------------------------ async save
    def _save_async(self, engine, step: int, client_state: Dict[str, Any]) -> Path:
        """The training thread's part (neox.checkpoint.background): copy, queue, return."""
        self.wait()  # at most one save in flight
        tag, final, partial = self._begin(step)
        rank, world = ranks.world()
        client_state = {**client_state, "step": step}
        job = WriteJob(tag, step, partial, rank, world)
        self._async.capture(engine, job, lambda: engine.save_checkpoint(
            str(self.directory), tag=partial.name, client_state=client_state, save_latest=False))
        rng, rng_file = rng_state(), partial / RNG_DIR / f"rank_{rank:05d}.pt"
        job.add(rng_file, lambda: torch.save(rng, rng_file))
        if rank == 0:
            text = json.dumps(jsonable(client_state), indent=1, sort_keys=True)
            job.add(partial / STATE_JSON, lambda: F.atomic_write_text(partial / STATE_JSON, text))
        self._async.start(job, self._commit_job, self._failed_job, self.commit_timeout_s)
        return final

    def _commit_job(self, job: WriteJob, digests: Dict[str, Dict[str, object]]) -> None:
        """Rank 0's writer, once every rank reported its files."""
        shutil.rmtree(job.partial / WRITERS, ignore_errors=True)
        self.fault("after_shards", job.step)
        self._commit(job.tag, job.step, digests)
        self.last_failure = None

    def _failed_job(self, job: WriteJob, exc: BaseException) -> None:
        """Rank 0's writer: the save failed; training goes on."""
        shutil.rmtree(job.partial, ignore_errors=True)  # give the space back
        self.last_failure = self._failure(job.step, exc)
        self.say(f"{self.last_failure}; training goes on, and the next save retries")

    def prepare(self, engine) -> None:
        """With async_save: allocate the host memory of the saves' copies now, in the background (call once
        the optimizer has its state, after the first step)."""
        if self.async_save:
            self._async.prepare(state_bytes(engine))

    def wait(self) -> None:
        """Return once this rank's background writer, if any, is done (its failure is in the log)."""
        self._async.wait()

    def wait_saved(self) -> None:
        """Wait for the writer; if the last save failed (known on rank 0), raise it as a synchronous save would:
        a run must not end, or stop for a requeue, saying its checkpoint was saved when it was not."""
        self.wait()
        if self.last_failure is not None:
            raise CheckpointError(self.last_failure)

    def close(self, abort: bool = False) -> None:
        """Wait for the writer, then give back the host memory of the snapshots. `abort`: the job is ending on
        an error, so rank 0's writer stops waiting for peers that may be dead (the save fails; `latest` stays)."""
        self._async.close(abort)

    def _prune(self, written: str) -> None:
        """Keep the newest `keep` checkpoints up to the one just written. A newer one (a crash before
        `latest` moved, or `latest` pointed back on purpose) is never removed here: it is replaced
        only when the run saves that same step again."""
        bound = step_of(written)
        tags = [t for t in self.complete_tags() if step_of(t) <= bound]
        doomed = [t for t in tags[: -self.keep] if t != written]
        for tag in doomed:
            shutil.rmtree(self.directory / tag, ignore_errors=True)
        for stale in self.directory.glob(f"{TAG_PREFIX}*{PARTIAL}"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.directory.glob(f"{TAG_PREFIX}*.replaced"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------------------------ verify
    def verify(self, tag: str) -> Optional[str]:
        """Collective: None if `tag` matches its manifest, else one line saying what is wrong."""
        root = self.directory / tag
        rank, world = ranks.world()
        problem: Optional[str] = None
        manifest = None
        if not root.is_dir():
            problem = "it does not exist"
        else:
            try:
                manifest = F.read_manifest(root)
            except ValueError as exc:
                problem = str(exc)
            if manifest is None and problem is None:
                problem = "it has no manifest.json (an interrupted save, or written by an older neox)"
        problems: List[str] = []
        if problem is None:
            problems = F.check_sizes(root, manifest)
            if not problems:
                rels = sorted(manifest["files"])
                problems = F.check_digests(root, manifest, rels[rank::world])
        found: List[str] = []
        for part in ranks.gather([problem] if problem else problems):
            found += [p for p in part if p not in found]  # every rank checks every size: report once
        if not found:
            return None
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return f"{found[0]}{more}"

    def read_state(self, tag: str) -> Dict[str, Any]:
        """neox's client state (run state, config) as saved, without touching any tensor file."""
        path = self.directory / tag / STATE_JSON
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is unreadable ({exc})") from None

    # ------------------------------------------------------------------------------------ load
    def load(self, engine, current_config: Optional[dict] = None) -> Optional[Dict[str, Any]]:
        """Resume from the newest usable checkpoint, if any; returns neox's client state.

        With `current_config` (the resolved run config), a change of model shape raises
        CheckpointError naming the fields; other changes are reported (also kept in `.warnings`).
        """
        self.wait()
        self.check_usable()
        candidates = ranks.broadcast(self.candidates())
        if not candidates:
            return None
        latest, why = read_latest(self.directory)
        bound = step_of(latest) if latest else None
        newer = [t for t in self.complete_tags() if bound is not None and step_of(t) > bound]
        failures = []
        for i, tag in enumerate(candidates):
            problem = self.verify(tag)
            if problem is not None:
                failures.append(f"{tag}: {problem}")
                nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                self.say(f"{self.directory / tag} is unusable: {problem}; "
                         + (f"falling back to {nxt}" if nxt else "no older checkpoint left"))
                continue
            if latest is None:
                self.say(f"{self.directory / 'latest'} is {why}: resuming from the newest verified "
                         f"checkpoint, {tag}")
            if newer:
                self.say(f"{', '.join(newer)}, newer than {latest} (which `latest` names), "
                         f"{'is' if len(newer) == 1 else 'are'} kept but not used; to resume from it, write "
                         f"its name into {self.directory / 'latest'}")
            return self._load_tag(engine, tag, current_config)
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({'; '.join(failures)}); "
                              "restore one, or move the directory away to start over")

    def _load_tag(self, engine, tag: str, current_config: Optional[dict]) -> Dict[str, Any]:
        root = self.directory / tag
        saved = self.read_state(tag)
        if current_config is not None and "config" in saved:
            self.warnings = check_resume_config(saved["config"], current_config)
            for w in self.warnings:
                self.say(f"warning: {w}")
        manifest = F.read_manifest(root) or {}
        recorded, now = manifest.get("layout", {}), self.layout
        if now is not None and layout_changed(recorded, now):
            self.say(f"resharding {tag}: {describe(recorded, now)}")
            old = Parallelism.from_record(recorded)
            if max(old.zero_stage, now.parallel.zero_stage) > 2:
                raise CheckpointError(f"{tag} was saved with {old.describe()}, this run has "
                                      f"{now.parallel.describe()}: resharding to or from ZeRO-3 is not supported "
                                      "yet; resume with the checkpoint's layout")
            # DeepSpeed's own loader knows neither our tensor shards nor other pipeline depths, and
            # restarts Adam across ZeRO partitionings: go through the layout-free full state instead
            load_across_layouts(engine, root, saved_layout(root, manifest, "resharding"), now, self.tp_rank,
                                self.say)
            client = {k: v for k, v in saved.items() if k in ("run_state", "config", "step")}
            return self._finish_load(root, tag, client)
        with safe_engine_loads(engine):
            try:
                path, client = engine.load_checkpoint(str(self.directory), tag=tag)
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many types; report one line
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise CheckpointError(f"DeepSpeed could not load {root}: {type(exc).__name__}: {first[:300]}") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {root} (no model states file for this layout)")
        return self._finish_load(root, tag, client)

    def _finish_load(self, root: Path, tag: str, client: Dict[str, Any]) -> Dict[str, Any]:
        """Every rank's random streams, then the client state."""
        rank = ranks.world()[0]
        rng_file = root / RNG_DIR / f"rank_{rank:05d}.pt"
        if not rng_file.is_file():
            rng_file = root / RNG_DIR / "rank_00000.pt"  # a new, larger layout: rank 0's streams
        if rng_file.is_file():
            set_rng_state(safe_load(rng_file))
        elif "rng" in client:  # checkpoints of the first neox version kept it in the client state
            set_rng_state(client["rng"])
        client.pop("rng", None)
        self.loaded_tag = tag
        return client
