"""Sharded preparation: N pieces prepared in parallel (processes or a Slurm array), then merged.

    python -m neox.data.prepare corpus.jsonl -o data/corpus -t tok.json --shards 8
    python -m neox.data.prepare 'web/*.jsonl.zst' -o data/web -t tok.json --shards 64 --slurm
    python -m neox.data.shards -o data/all data/part1 data/part2     # merge prepared datasets

The inputs, in their usual order, are cut into N contiguous ranges of about equal bytes: plain
JSON-lines files are cut between lines (a line belongs to the range its first byte is in), other
files (compressed, parquet, text) go whole to one range. Piece k holds range k's documents, so
the pieces concatenated are exactly the single-process output, and merging them (a byte copy of
the .bin files, and an index over all sizes) gives the same .bin/.idx byte for byte.

Pieces live in `PREFIX.shards/`: `piece-K-of-N.bin/.idx`, written atomically, then a done-marker
`piece-K-of-N.done.json` recording a key of what the piece was made from (its inputs' ranges,
sizes and mtimes, the tokenizer, dtype and read options). Running the same command again
prepares only the pieces whose marker is missing or stale, so an interrupted run (a killed
process, a cancelled array task, a bad input fixed since) resumes where it stopped. A piece that
fails leaves the others in place and says which file and line failed. After a verified merge
the folder is removed.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from neox.data import sources as src_mod
from neox.data.fsutil import atomic_path, temp_name
from neox.data.indexed import IndexedDataset, IndexedDatasetWriter, paths, write_index
from neox.data.progress import Counts, Progress
from neox.data.sources import ReadStats, Source
from neox.data.stream import ENCODERS, Docs, cpu_count
from neox.errors import DataError, NeoxError

FORMAT = 1  # bump when what a piece holds for the same key changes


# ---------------------------------------------------------------------------------------------
# What each piece reads


@dataclass(frozen=True)
class Item:
    """One input of a piece: a whole file, or the lines of a plain JSON-lines file whose first
    byte lies in [start, end)."""

    path: str
    size: int = 0  # bytes on disk (0 for a datasets source)
    mtime_ns: int = 0
    start: int = 0
    end: int | None = None  # None: to the end of the file
    explicit: bool = True  # named on the command line (an empty one is an error)
    hf: bool = False

    @property
    def length(self) -> int:
        """Bytes of the input this item stands for (progress counts these)."""
        return max(0, min(self.size, self.size if self.end is None else self.end) - self.start)

    @property
    def jsonl(self) -> bool:
        return not self.hf and src_mod._kind(self.path) == "jsonl"

    @property
    def splittable(self) -> bool:
        return self.jsonl and self.size > 0 and not self.path.endswith((".gz", ".zst"))


def plan(sources: list[Source], shards: int) -> list[list[Item]]:
    """The items of each of `shards` pieces: contiguous, in input order, about equal bytes."""
    items = []
    for s in sources:
        if s.hf:
            if shards > 1:
                raise DataError(f"--shards reads local files, and hf:{s.path} is a datasets "
                                "source; save it as JSON lines first (Dataset.to_json) or "
                                "prepare it without --shards")
            items.append(Item(s.path, explicit=s.explicit, hf=True))
            continue
        try:
            st = os.stat(s.path)
        except OSError as e:
            raise src_mod._read_error(s.path, e) from None
        items.append(Item(s.path, st.st_size, st.st_mtime_ns, explicit=s.explicit))
    total = sum(i.size for i in items)
    bounds = [total * k // shards for k in range(1, shards)]
    pieces: list[list[Item]] = [[] for _ in range(shards)]
    offset = 0  # of the item in the whole input
    for item in items:
        if item.splittable:
            cuts = [b - offset for b in bounds if offset < b < offset + item.size]
            for a, e in zip([0, *cuts], [*cuts, None]):
                part = item if not cuts else replace(item, start=a, end=e)
                pieces[bisect.bisect_right(bounds, offset + a)].append(part)
        else:  # whole, to the piece holding its middle byte
            pieces[bisect.bisect_right(bounds, offset + item.size // 2)].append(item)
        offset += item.size
    return pieces


def saved_plan(work: Path, sources: list[Source], shards: int) -> list[list[Item]]:
    """plan(), or the plan of an earlier run into `work` over the same files in the same order.

    Reusing the cuts keeps every piece whose files did not change valid when one file was fixed
    since (cuts only partition a file's lines, whatever the file holds now).
    """
    path = work / "plan.json"
    files = [[s.path, s.explicit] for s in sources]
    try:
        saved = json.loads(path.read_text())
        if (saved["format"], saved["shards"], saved["files"]) == (FORMAT, shards, files):
            stat = {}
            for name, _ in files:
                try:
                    stat[name] = os.stat(name)
                except OSError as e:
                    raise src_mod._read_error(name, e) from None
            return [[Item(d["path"], stat[d["path"]].st_size, stat[d["path"]].st_mtime_ns,
                          d["start"], d["end"], d["explicit"]) for d in piece]
                    for piece in saved["pieces"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none, or another run's: plan afresh
    pieces = plan(sources, shards)
    keep = ("path", "start", "end", "explicit")
    _write_json(path, {"format": FORMAT, "shards": shards, "files": files,
                       "pieces": [[{k: getattr(i, k) for k in keep} for i in p] for p in pieces]})
    return pieces


class ItemDocs(Docs):
    """The documents of some items, in order, with their places and the bytes read so far.

    JSON lines are read here (so a range can start mid-file); other files through
    sources.iter_documents. Both give each line to the same sources._json_doc.
    """

    def __init__(self, items: Sequence[Item], *, text_field: str = "text", split: str = "train",
                 hf_config: str | None = None, streaming: bool = False,
                 invalid_utf8: str = "skip") -> None:
        self.items = list(items)
        self.read = dict(text_field=text_field, split=split, hf_config=hf_config,
                         streaming=streaming, invalid_utf8=invalid_utf8)
        self.stats = ReadStats()
        self.done = 0  # bytes of the items before the current one
        self.here = 0  # bytes of the current item read
        self._first_line: dict[int, int] = {}  # item -> file offset its first line starts at

    def counts(self) -> Counts:
        s = self.stats
        return Counts(documents=s.documents, bytes_read=self.done + self.here,
                      skipped_invalid_utf8=s.skipped_invalid_utf8,
                      skipped_empty_files=s.skipped_empty_files)

    def __iter__(self) -> Iterator[tuple[str, object]]:
        for k, item in enumerate(self.items):
            self.here = 0
            if item.jsonl:
                yield from self._jsonl(k, item)
            else:
                source = Source(item.path, hf=item.hf, explicit=item.explicit)
                docs = src_mod.iter_documents([source], stats=self.stats, **self.read)
                for n, doc in enumerate(docs):
                    yield doc, (k, n)
            self.done += item.length
        self.here = 0

    def _jsonl(self, k: int, item: Item) -> Iterator[tuple[str, object]]:
        if item.start == 0:
            self.stats.files += 1
            if item.size == 0:
                if item.explicit:
                    raise DataError(f"input file {item.path} is empty; remove it from the inputs")
                self.stats.skipped_empty_files += 1
                return
        end = item.size if item.end is None else item.end
        line = 0
        try:
            with src_mod._open(item.path) as f:
                if item.start:
                    f.seek(item.start - 1)
                    if f.read(1) != b"\n":
                        f.readline()  # the line in progress belongs to the range before
                pos = f.tell() if item.start else 0
                self._first_line[k] = pos
                # compressed files tell() decompressed bytes: their progress moves at the end
                plain = not item.path.endswith((".gz", ".zst"))
                while pos < end or item.end is None:
                    raw = f.readline()
                    if not raw:
                        break
                    line += 1
                    pos += len(raw)
                    if plain:
                        self.here = min(pos, end) - item.start
                    where = f"{item.path}:{line}" if item.start == 0 else _MARK
                    try:
                        for doc in src_mod._json_doc(raw, where, self.read["text_field"],
                                                     self.read["invalid_utf8"], self.stats):
                            self.stats.documents += 1
                            yield doc, (k, line)
                    except DataError as e:
                        if where is not _MARK:
                            raise
                        raise DataError(str(e).replace(_MARK, self.describe((k, line)))) from None
        except (OSError, EOFError, src_mod.zlib.error) as e:
            raise src_mod._read_error(item.path, e, line) from None

    def describe(self, where: object) -> str:
        k, n = where  # type: ignore[misc]
        item = self.items[k]
        if item.hf:
            return f"dataset {item.path} example {n}"
        if item.jsonl:
            return f"{item.path}:{_line_number(item.path, self._first_line.get(k, 0)) + n}"
        if src_mod._kind(item.path) == "parquet":
            return f"{item.path} row {n + 1}"
        return item.path


_MARK = "\x00line\x00"  # stands for "file:line" until a message needs the line number


def _line_number(path: str, offset: int) -> int:
    """Lines before byte `offset` of a plain file (read only when an error names a line)."""
    if offset == 0:
        return 0
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


# ---------------------------------------------------------------------------------------------
# One piece, in its own process (local) or Slurm array task


@dataclass(frozen=True)
class PieceJob:
    """Everything a piece needs; pickled to the process or Slurm task that prepares it."""

    index: int
    count: int
    items: tuple[Item, ...]
    work_dir: str
    tokenizer: str  # the tokenizer.json saved in work_dir, or "bytes"
    tokenizer_id: str
    eod_token: str | None
    dtype: str
    text_field: str
    invalid_utf8: str
    encoder: str
    threads: int | None = None  # None: the CPUs this process may use

    @property
    def prefix(self) -> str:
        return str(Path(self.work_dir) / f"piece-{self.index:05d}-of-{self.count:05d}")

    @property
    def marker(self) -> Path:
        return Path(self.prefix + ".done.json")

    @property
    def status_file(self) -> Path:
        return Path(self.prefix + ".status.json")

    def key(self) -> str:
        """What the piece is made from; a marker with another key is stale."""
        what = {"format": FORMAT, "items": [asdict(i) for i in self.items],
                "tokenizer": self.tokenizer_id, "eod_token": self.eod_token, "dtype": self.dtype,
                "text_field": self.text_field, "invalid_utf8": self.invalid_utf8}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]

    def finished(self) -> dict | None:
        """The done-marker, when it matches this job and its .bin/.idx are in place."""
        try:
            done = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        bin_path, idx_path = paths(self.prefix)
        if done.get("key") != self.key() or not idx_path.exists() or not bin_path.exists():
            return None
        if bin_path.stat().st_size != done["tokens"] * np.dtype(self.dtype).itemsize:
            return None
        return done


def run_piece(job: PieceJob) -> dict:
    """Prepare one piece; the done-marker (or a status file saying what failed) tells the parent.

    Returns the marker's content, or {"error": message} for bad input (never raises for it, so a
    Slurm task ends cleanly and the parent reads the message).
    """
    threads = job.threads or cpu_count()
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # tokenizers' own threads
    t0 = time.perf_counter()
    job.status_file.unlink(missing_ok=True)
    try:
        from neox.data.stream import encode_into
        from neox.data.tokenizer import load_tokenizer

        tok = load_tokenizer(job.tokenizer, job.eod_token)
        reporter = _StatusWriter(job.status_file)
        reporter.update(Counts())  # says the piece runs, and where (host, pid)
        docs = ItemDocs(job.items, text_field=job.text_field, invalid_utf8=job.invalid_utf8)
        with IndexedDatasetWriter(job.prefix, np.dtype(job.dtype)) as writer:
            encoder, counts = encode_into(writer, docs, tok, job.tokenizer, job.eod_token,
                                          encoder=job.encoder, threads=threads,
                                          progress=reporter)  # type: ignore[arg-type]
        done = {"key": job.key(), "index": job.index, "count": job.count,
                "tokenizer_id": job.tokenizer_id, "dtype": job.dtype, "encoder": encoder,
                "seconds": time.perf_counter() - t0, "files": docs.stats.files,
                "host": os.uname().nodename, **asdict(counts)}
        with atomic_path(job.marker) as tmp:
            tmp.write_text(json.dumps(done, indent=1))
        job.status_file.unlink(missing_ok=True)
        return done
    except (NeoxError, OSError) as e:  # OSError: the piece's own files (inputs' are DataErrors)
        msg = str(e) if isinstance(e, NeoxError) else (
            f"cannot write {job.prefix}.* ({e.strerror or e}); free some space or choose "
            "another -o")
        _write_json(job.status_file, {"error": msg})
        return {"error": msg}
    except Exception as e:  # a bug, not bad input: keep the traceback in this piece's log
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e} (a bug in neox; the traceback is in this piece's log)"
        _write_json(job.status_file, {"error": msg})
        return {"error": msg}


def _write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj))


class _StatusWriter:
    """Stands in for Progress in a piece: writes the counts to a file the parent polls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = -1.0

    def update(self, counts: Counts) -> None:
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            _write_json(self.path, {"counts": asdict(counts), "pid": os.getpid(),
                                    "host": os.uname().nodename})


def _piece_main(job: PieceJob) -> None:
    """Entry of a local piece process."""
    run_piece(job)


# ---------------------------------------------------------------------------------------------
# The parent: plan, run what is missing, merge


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how the Slurm array runs (one array task per piece)."""

    partition: str | None = None
    account: str | None = None
    time_min: int = 60
    cpus_per_shard: int = 2
    parallelism: int | None = None  # array tasks running at once; None: as Slurm allows


def slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """The Slurm options of prepare's command line; refuses them without --slurm."""
    given = {k: getattr(args, k) for k in ("partition", "account", "time_min", "cpus_per_shard")
             if getattr(args, k) is not None}
    if not args.slurm:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise DataError(f"{flags} only {verb} with --slurm; add --slurm or drop them")
        return None
    return SlurmOptions(**given, parallelism=args.workers)


def tokenizer_id(path: str | Path) -> str:
    """A hash of a tokenizer.json's content, however its keys were ordered."""
    text = Path(path).read_text()
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()[:16]


def prepare_sharded(inputs: Sequence[str], output: str, tokenizer: str = "bytes", *,
                    shards: int, workers: int | None = None, slurm: SlurmOptions | None = None,
                    encoder: str = "auto", text_field: str = "text",
                    invalid_utf8: str = "skip", eod_token: str | None = None,
                    model_vocab_size: int | None = None, progress: bool = True):
    """prepare() in `shards` pieces, `workers` processes at once (or a Slurm array), merged."""
    from neox.data.indexed import best_dtype
    from neox.data.prepare import PrepareResult, _check_output, _log, _make_tokenizer
    from neox.data.sources import iter_documents, resolve_inputs

    t0 = time.perf_counter()
    if shards < 1:
        raise DataError(f"--shards {shards}: give 1 or more")
    if encoder not in ENCODERS:
        raise DataError(f"--encoder {encoder}: choose one of {', '.join(ENCODERS)}")
    sources = resolve_inputs(list(inputs))
    output = _check_output(output)
    work = Path(output + ".shards")
    # A folder or glob holding the output must not read it (or the pieces) back in.
    own = {os.path.abspath(output + ext) for ext in (".bin", ".idx", ".meta.json",
                                                      ".tokenizer.json")}
    sources = [s for s in sources if s.explicit or not (
        os.path.abspath(s.path) in own or os.path.abspath(s.path).startswith(f"{work}{os.sep}"))]
    plan(sources, shards)  # refuses what cannot be sharded before any training or writing
    read = dict(text_field=text_field, invalid_utf8=invalid_utf8)
    warnings: list[str] = []
    tok = _make_tokenizer(tokenizer, lambda: iter_documents(sources, **read), eod_token,
                          progress, warnings)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise DataError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's "
                        f"padded vocab is {model_vocab_size}; use a smaller tokenizer or "
                        "a bigger model vocab")
    work.mkdir(exist_ok=True)
    _clean_temp_files(work)
    items = saved_plan(work, sources, shards)
    tok_path = work / "tokenizer.json"
    with atomic_path(tok_path) as tmp:  # the same content again when resuming
        tok.save(tmp)
    tok_id = "bytes" if tok.name == "bytes" else tokenizer_id(tok_path)
    dtype = best_dtype(tok.vocab_size)
    jobs = [PieceJob(k, shards, tuple(its), str(work), "bytes" if tok.name == "bytes"
                     else str(tok_path), tok_id, eod_token, dtype.name, text_field,
                     invalid_utf8, encoder) for k, its in enumerate(items)]
    todo = [j for j in jobs if j.finished() is None]
    if len(todo) < len(jobs):
        _log(progress, f"resuming: {len(jobs) - len(todo)} of {shards} pieces are already "
             f"prepared in {work}; preparing the other {len(todo)}")
    total = sum(i.length for i in (i for j in todo for i in j.items))
    if todo:
        if slurm is not None:
            failures = _run_slurm(todo, slurm, work, total, progress)
        else:
            failures = _run_local(todo, workers or min(len(todo), cpu_count()), total, progress)
        if failures:
            for line in failures:
                print(f"[neox.data.prepare] {line}", file=sys.stderr, flush=True)
            kept = sum(j.finished() is not None for j in jobs)
            raise DataError(f"{len(failures)} of {shards} pieces failed ({failures[0]}); the "
                            f"{kept} prepared pieces are kept in {work}: fix the input and run "
                            "the same command again to prepare only the missing pieces")
    done = [j.finished() for j in jobs]
    if any(d is None for d in done):  # a piece reported success but its files are gone
        missing = [j.index for j, d in zip(jobs, done) if d is None]
        raise DataError(f"pieces {missing} of {work} vanished after being prepared; run the "
                        "same command again")
    counts = Counts()
    for d in done:
        counts.add(Counts(**{k: d[k] for k in asdict(Counts())}))
    if counts.documents == 0:
        raise DataError(f"the inputs {' '.join(inputs)} hold no documents (skipped: "
                        f"{counts.skipped()}); check them")
    encoders = sorted({d["encoder"] for d in done})
    result = PrepareResult(output, counts.documents, counts.tokens, time.perf_counter() - t0,
                           tok.vocab_size, tok.eod_id, dtype.name, counts.skipped_invalid_utf8,
                           counts.skipped_empty_files, warnings)
    meta = {**asdict(result), "inputs": list(inputs), "tokenizer": tokenizer,
            "text_field": text_field, "files": sum(d["files"] for d in done),
            "shards": shards, "encoder": "+".join(encoders), "bytes_read": counts.bytes_read}
    def sidecars() -> None:  # before the .bin, then the .idx: as prepare() does
        with atomic_path(f"{output}.meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        with atomic_path(f"{output}.tokenizer.json") as tmp:
            shutil.copyfile(tok_path, tmp)

    try:
        merge([(j.prefix, d["tokenizer_id"], d["dtype"]) for j, d in zip(jobs, done)], output,
              sidecars)
    except OSError as e:
        raise DataError(f"cannot write the output {output}.* ({e.strerror or e}); free some "
                        f"space or choose another -o (the pieces are kept in {work})") from None
    shutil.rmtree(work, ignore_errors=True)
    s = max(result.seconds, 1e-9)
    _log(progress, f"wrote {output}.bin/.idx from {shards} pieces: {counts.documents} docs, "
         f"{counts.tokens / 1e6:.2f} M tokens, {counts.bytes_read / 1e6:.1f} MB read in "
         f"{s:.1f} s ({counts.tokens / s / 1e6:.2f} M tok/s, {counts.bytes_read / s / 1e6:.1f} "
         f"MB/s, encoder {'+'.join(encoders)}); skipped: {counts.skipped()}")
    return result


def _clean_temp_files(work: Path) -> None:
    """Temp files of pieces killed mid-write: nothing else writes in the work folder."""
    for p in work.glob("*.tmp-*"):
        p.unlink(missing_ok=True)


def _poll_status(jobs: list[PieceJob], base: dict[int, Counts]) -> Counts:
    """The counts of running pieces (from their status files) plus those of finished ones."""
    total = Counts()
    for j in jobs:
        if j.index not in base:
            try:
                c = Counts(**json.loads(j.status_file.read_text())["counts"])
            except (OSError, ValueError, TypeError, KeyError):
                c = Counts()
            total.add(c)
        else:
            total.add(base[j.index])
    return total


def _finished_counts(job: PieceJob) -> Counts:
    done = job.finished()
    return Counts(**{k: done[k] for k in asdict(Counts())}) if done else Counts()


def _failure(job: PieceJob, how: str) -> str:
    try:
        return f"piece {job.index}: {json.loads(job.status_file.read_text())['error']}"
    except (OSError, ValueError, KeyError):
        return f"piece {job.index} {how}"


def _run_local(todo: list[PieceJob], procs: int, total: int, progress: bool) -> list[str]:
    """Prepare the pieces in `procs` processes at once; the failures, one line each."""
    threads = max(1, cpu_count() // max(1, min(procs, len(todo))))
    queue = [replace(j, threads=threads) for j in todo]
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or tokenizer state
    running: dict[int, tuple[PieceJob, mp.process.BaseProcess]] = {}
    ended: dict[int, Counts] = {}
    failures: list[str] = []
    with Progress(total or None, progress, f"{len(todo)} pieces") as bar:
        try:
            while queue or running:
                while queue and len(running) < procs:
                    job = queue.pop(0)
                    proc = ctx.Process(target=_piece_main, args=(job,),
                                       name=f"neox-piece-{job.index}")
                    proc.start()
                    running[proc.sentinel] = (job, proc)
                ready = mp.connection.wait(list(running), timeout=0.5)
                for sentinel in ready:
                    job, proc = running.pop(sentinel)  # type: ignore[index]
                    proc.join()
                    ended[job.index] = _finished_counts(job)
                    if job.finished() is None:
                        code = proc.exitcode or 0
                        how = (f"was killed (signal {-code})" if code < 0 else
                               f"exited with status {code} without finishing")
                        failures.append(_failure(job, how))
                bar.update(_poll_status(todo, ended))
        finally:
            for job, proc in running.values():  # interrupted: stop the pieces still running
                proc.terminate()
                proc.join()
    return failures


def _run_slurm(todo: list[PieceJob], opts: SlurmOptions, work: Path, total: int,
               progress: bool) -> list[str]:
    """Prepare the pieces as one Slurm job array (submitit); the failures, one line each."""
    if shutil.which("sbatch") is None:
        raise DataError("--slurm: sbatch not found (this is not a Slurm submit host); run on a "
                        "login node, or drop --slurm to prepare the pieces here")
    import submitit

    executor = submitit.SlurmExecutor(folder=work / "slurm", max_num_timeout=0)
    params: dict = dict(job_name=f"neox-prepare-{Path(work).name}", time=int(opts.time_min),
                        cpus_per_task=int(opts.cpus_per_shard), ntasks_per_node=1, nodes=1,
                        setup=["export OMP_NUM_THREADS=1"])
    if opts.parallelism:
        params["array_parallelism"] = int(opts.parallelism)
    for key in ("partition", "account"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    executor.update_parameters(**params)
    jobs = [replace(j, threads=int(opts.cpus_per_shard)) for j in todo]
    record = work / "slurm-jobs.json"  # piece -> [job id, key] of the tasks submitted so far
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        recorded = {}
    queued = _queued([jid for jid, _ in recorded.values()])
    attached = {}
    for j in jobs:
        jid, key = recorded.get(str(j.index), (None, None))
        if jid not in queued:
            continue
        earlier = submitit.SlurmJob(folder=work / "slurm", job_id=jid)
        if earlier.paths.result_pickle.exists():
            continue  # run_piece has returned: Slurm is only finishing the task
        if key != j.key():
            raise DataError(f"piece {j.index}'s earlier Slurm task {jid} still runs, on "
                            "inputs that changed since; wait for it to end or scancel it, then "
                            "run the same command again")
        attached[j.index] = earlier
    fresh = [j for j in jobs if j.index not in attached]
    try:
        submitted = executor.map_array(run_piece, fresh) if fresh else []
    except Exception as exc:  # submitit wraps sbatch's stderr in its own error
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        said = [ln for ln in lines if "error" in ln.lower()] or lines[-2:]
        raise DataError(f"sbatch refused the array: {' | '.join(said)}") from None
    recorded.update({str(j.index): [sj.job_id, j.key()] for j, sj in zip(fresh, submitted)})
    _write_json(record, recorded)
    try:
        return _wait_slurm(jobs, attached, fresh, submitted, work, total, progress)
    except KeyboardInterrupt:
        print("[neox.data.prepare] interrupted: the Slurm tasks keep running; the same "
              "command again waits for them and merges (or scancel them)",
              file=sys.stderr, flush=True)
        raise


def _wait_slurm(jobs: list[PieceJob], attached: dict, fresh: list[PieceJob], submitted: list,
                work: Path, total: int, progress: bool) -> list[str]:
    """Wait for the array tasks, showing progress; the failures, one line each."""
    ids = sorted({s.job_id.split("_")[0] for s in submitted})
    if attached:
        print(f"[neox.data.prepare] waiting for {len(attached)} pieces still running from an "
              f"earlier submission ({', '.join(sj.job_id for sj in attached.values())})",
              file=sys.stderr, flush=True)
    if fresh:
        print(f"[neox.data.prepare] submitted Slurm array {', '.join(ids)}: {len(fresh)} "
              f"pieces; logs in {work / 'slurm'}", file=sys.stderr, flush=True)
    by_index = {**attached, **{j.index: sj for j, sj in zip(fresh, submitted)}}
    ended: dict[int, Counts] = {}
    failures: list[str] = []
    pending = {j.index: (j, by_index[j.index]) for j in jobs}
    with Progress(total or None, progress, f"{len(jobs)} pieces (Slurm)") as bar:
        while pending:
            for index, (job, sj) in list(pending.items()):
                if not sj.done():
                    continue
                del pending[index]
                ended[index] = _finished_counts(job)
                if job.finished() is None:
                    failures.append(_failure(job, f"(Slurm job {sj.job_id}) ended {sj.state} "
                                                  f"without finishing; its log: "
                                                  f"{sj.paths.stderr}"))
            bar.update(_poll_status(jobs, ended))
            if pending:
                time.sleep(1.0)
    return failures


def _queued(job_ids: list[str]) -> set[str]:
    """Those of `job_ids` (array tasks `123_4` too) that Slurm still has pending or running."""
    if not job_ids:
        return set()
    import subprocess

    arrays = sorted({jid.split("_")[0] for jid in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    live = {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "SUSPENDED"}  # not COMPLETING
    return {jid for jid, _, state in (ln.partition("|") for ln in out.split())
            if state in live} & set(job_ids)


# ---------------------------------------------------------------------------------------------
# Merging


def merge(pieces: Sequence[tuple[str, str, str]], output: str,
          sidecars: Callable[[], None] = lambda: None) -> None:
    """Concatenate prepared datasets into `output.bin/.idx`, in order.

    `sidecars` writes the files beside the output once the pieces are checked, before the
    .bin and the .idx appear (so a reader never finds the data without them).

    `pieces` are (prefix, tokenizer id, dtype) in order. Refuses pieces of different tokenizers
    or dtypes; checks every piece's index against its .bin first, and the merged result after.
    """
    first_prefix, first_tok, first_dtype = pieces[0]
    datasets = []
    for prefix, tok, dtype in pieces:
        if tok != first_tok:
            raise DataError(f"{prefix} was prepared with tokenizer {tok} but {first_prefix} with "
                            f"{first_tok}; merge only pieces prepared with the same tokenizer")
        ds = IndexedDataset(prefix)  # checks the .idx against the .bin
        if ds.dtype.name != dtype or ds.dtype.name != first_dtype:
            raise DataError(f"{prefix} holds {ds.dtype.name} tokens but {first_prefix} "
                            f"{first_dtype}; merge only pieces of one dtype (prepare them with "
                            "the same tokenizer)")
        if not np.array_equal(ds.doc_idx, np.arange(len(ds) + 1)):
            raise DataError(f"{prefix} holds several sequences per document (sentence "
                            "splitting); only one-sequence-per-document pieces can be merged")
        datasets.append(ds)
    dtype = datasets[0].dtype
    sizes = np.concatenate([ds.sizes for ds in datasets])
    sidecars()
    bin_path, idx_path = paths(output)
    tmp_bin = temp_name(bin_path)
    try:
        with open(tmp_bin, "wb") as out:
            for ds in datasets:
                with open(paths(ds.prefix)[0], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        # renames the .bin into place, then the .idx: never an index without its data
        write_index(idx_path, dtype, sizes, bin_tmp=tmp_bin, bin_final=bin_path)
    finally:
        tmp_bin.unlink(missing_ok=True)
    _verify(output, datasets, sizes)


def _verify(output: str, datasets: list[IndexedDataset], sizes: np.ndarray) -> None:
    """The merged index describes its .bin (IndexedDataset checks that), holds every piece's
    sizes in order, and each piece's first and last document read back the same."""
    merged = IndexedDataset(output)
    if not np.array_equal(merged.sizes, sizes) or merged.dtype != datasets[0].dtype:
        raise DataError(f"the merged index {output}.idx does not match its pieces; run again")
    first = 0
    for ds in datasets:
        for i in {0, len(ds) - 1} if len(ds) else ():
            if not np.array_equal(merged[first + i], ds[i]):
                raise DataError(f"{output}.bin differs from {ds.prefix}.bin at its document "
                                f"{i} (a disk or copy error?); run again")
        first += len(ds)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m neox.data.shards -o OUT PREFIX...`: merge prepared datasets into one."""
    p = argparse.ArgumentParser(prog="python -m neox.data.shards",
                                description="Merge prepared .bin/.idx datasets (same tokenizer) "
                                "into one, in the order given.")
    p.add_argument("prefixes", nargs="+", help="prepared datasets (PREFIX.bin/.idx)")
    p.add_argument("-o", "--output", required=True, help="output prefix")
    args = p.parse_args(argv)
    try:
        pieces = []
        for prefix in args.prefixes:
            sidecar = Path(f"{prefix}.tokenizer.json")
            if not sidecar.exists():
                raise DataError(f"{prefix} has no {sidecar.name} beside it, so its tokenizer is "
                                "unknown; merge only datasets prepared by neox.data.prepare")
            pieces.append((prefix, tokenizer_id(sidecar), IndexedDataset(prefix).dtype.name))
        from neox.data.prepare import _check_output

        output = _check_output(args.output)

        def sidecar() -> None:
            with atomic_path(f"{output}.tokenizer.json") as tmp:
                shutil.copyfile(f"{args.prefixes[0]}.tokenizer.json", tmp)

        merge(pieces, output, sidecar)
    except OSError as e:
        print(f"neox: error: cannot write {args.output}.* ({e.strerror or e}); free some space "
              "or choose another -o", file=sys.stderr)
        return 2
    except NeoxError as e:
        print(f"neox: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}.bin/.idx from {len(pieces)} datasets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
