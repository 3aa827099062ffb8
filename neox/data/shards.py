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
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence


from neox.data.fsutil import atomic_path
from neox.data.indexed import IndexedDataset
from neox.data.progress import Counts, Progress
from neox.data.stream import ENCODERS, cpu_count
from neox.data.merge import merge
from neox.data.pieces import Item, ItemDocs, PieceJob, piece_main, write_json, plan, run_piece, saved_plan
from neox.errors import DataError, NeoxError

__all__ = ["Item", "ItemDocs", "PieceJob", "SlurmOptions", "main", "merge", "plan", "prepare_sharded", "slurm_options",
           "tokenizer_id"]  # Item, ItemDocs, PieceJob, plan, merge: re-exported for prepare and the tests


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
    from neox.data.prepare import PrepareResult, _check_output, _log, make_tokenizer
    from neox.data.sources import iter_documents, resolve_inputs

    t0 = time.perf_counter()
    if shards < 1:
        raise DataError(f"--shards {shards}: give 1 or more")
    if encoder not in ENCODERS:
        raise DataError(f"--encoder {encoder}: choose one of {', '.join(ENCODERS)}")
    sources = resolve_inputs(list(inputs))
    output = _check_output(output)
    work = Path(output + ".shards")
    _check_work_folder(work)
    # A folder or glob holding the output must not read it (or the pieces) back in.
    own = {os.path.abspath(output + ext) for ext in (".bin", ".idx", ".meta.json",
                                                      ".tokenizer.json")}
    sources = [s for s in sources if s.explicit or not (
        os.path.abspath(s.path) in own or os.path.abspath(s.path).startswith(f"{work}{os.sep}"))]
    plan(sources, shards)  # refuses what cannot be sharded before any training or writing
    read = dict(text_field=text_field, invalid_utf8=invalid_utf8)
    warnings: list[str] = []
    tok = make_tokenizer(tokenizer, lambda: iter_documents(sources, **read), eod_token,
                         progress, warnings, model_vocab_size)
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


def _check_work_folder(work: Path) -> None:
    """The pieces' folder is removed after the merge: refuse one that a sharded preparation did not
    make (no plan.json in it), so a user's own folder of that name is never emptied."""
    if work.exists() and not work.is_dir():
        raise DataError(f"{work} is a file; the pieces of --shards are written in a folder of that name: "
                        "move it away or choose another -o")
    if work.is_dir() and any(work.iterdir()) and not (work / "plan.json").is_file():
        raise DataError(f"{work} exists and was not made by `neox.data.prepare --shards` (it has no plan.json); "
                        "its content would be removed after the merge: move it away or choose another -o")


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
                    proc = ctx.Process(target=piece_main, args=(job,),
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
    write_json(record, recorded)
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
