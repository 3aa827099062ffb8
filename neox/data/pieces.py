"""One piece of a sharded preparation (`neox.data.shards`): the contiguous range of the inputs it reads,
the key that says whether a finished piece is still valid, and the job a process or a Slurm array task
runs to write it (atomically, with a done-marker and a status file the parent polls).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from neox.data import sources as src_mod
from neox.data.fsutil import atomic_path
from neox.data.indexed import IndexedDatasetWriter, paths
from neox.data.progress import Counts
from neox.data.sources import Source
from neox.data.stream import Docs, cpu_count
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
    write_json(path, {"format": FORMAT, "shards": shards, "files": files,
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
        self.stats = Counts()  # what the readers counted; bytes_read follows the items (counts())
        self.done = 0  # bytes of the items before the current one
        self.here = 0  # bytes of the current item read
        self._first_line: dict[int, int] = {}  # item -> file offset its first line starts at

    def counts(self) -> Counts:
        return replace(self.stats, bytes_read=self.done + self.here)

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
        write_json(job.status_file, {"error": msg})
        return {"error": msg}
    except Exception as e:  # a bug, not bad input: keep the traceback in this piece's log
        traceback.print_exc()
        msg = f"{type(e).__name__}: {e} (a bug in neox; the traceback is in this piece's log)"
        write_json(job.status_file, {"error": msg})
        return {"error": msg}


def write_json(path: Path, obj: dict) -> None:
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
            write_json(self.path, {"counts": asdict(counts), "pid": os.getpid(),
                                    "host": os.uname().nodename})


def piece_main(job: PieceJob) -> None:
    """Entry of a local piece process."""
    run_piece(job)
