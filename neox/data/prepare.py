"""Prepare a corpus once into `.bin/.idx` files: `python -m neox.data.prepare --help`.

    python -m neox.data.prepare 'corpus/*.jsonl.gz' -o data/corpus --tokenizer tokenizer.json
    python -m neox.data.prepare hf:wikitext --hf-config wikitext-2-raw-v1 -o data/wt2 \\
        --tokenizer bpe:16384

    python -m neox.data.prepare big.jsonl -o data/big -t tokenizer.json --shards 64 --slurm

A reader thread parses documents while whole batches are encoded on every core: by tiktoken
when it gives exactly the tokenizer's ids (byte-level BPEs, checked: neox.data.fast_bpe and
neox.data.stream), else by the tokenizer's Rust threads (`--workers 1`) or in N processes
(`--workers N`). Batches stay in order and only a few are in flight, so memory stays flat on
any corpus size. `--shards N` prepares N pieces in parallel processes or a Slurm array and
merges them into the same files (neox.data.shards). Beside the output we write `PREFIX.tokenizer.json` (the tokenizer used, which the
trainer finds on its own) and `PREFIX.meta.json` (what went in, counts, timings). Every file
appears under its final name only when complete.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from neox.data.fsutil import atomic_path, temp_name
from neox.data.indexed import IndexedDatasetWriter, best_dtype
from neox.data.progress import Progress
from neox.data.shards import ItemDocs, SlurmOptions, plan, prepare_sharded, slurm_options
from neox.data.sources import iter_documents, resolve_inputs
from neox.data.stream import ENCODERS, encode_into
from neox.data.tokenizer import Tokenizer, encode_documents, load_tokenizer, train_bpe
from neox.errors import DataError, NeoxError


@dataclass
class PrepareResult:
    prefix: str
    documents: int
    tokens: int
    seconds: float
    vocab_size: int
    eod_id: int
    dtype: str
    skipped_invalid_utf8: int
    skipped_empty_files: int
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# Worker side: each process loads the tokenizer once, then encodes whole batches.
_worker_tok: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_spec: str, eod_token: str | None, dtype: str) -> None:
    global _worker_tok, _worker_dtype
    _worker_tok = load_tokenizer(tokenizer_spec, eod_token)
    _worker_dtype = np.dtype(dtype)


def _encode(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tok is not None and _worker_dtype is not None
    flat, lengths = encode_documents(_worker_tok, batch)
    return flat.astype(_worker_dtype), lengths  # narrow before pickling: half the bytes


def _read_ahead(items: Iterator[list[str]], depth: int) -> Iterator[list[str]]:
    """Iterate `items` in a background thread, at most `depth` ahead; errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        """Queue `item` unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=fill, name="neox-prepare-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _encoded_in_order(tok_spec: str, eod_token: str | None, dtype: np.dtype,
                      batch_iter: Iterator[list[str]], workers: int
                      ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    """(docs in batch, encoded batch), in input order, with a bounded number in flight."""
    if workers <= 1:
        # In-process: Rust's own threads use every core and release the GIL, so a reader
        # thread parses the next batches meanwhile.
        _init_worker(tok_spec, eod_token, dtype.str)
        for batch in _read_ahead(batch_iter, depth=4):
            yield len(batch), _encode(batch)
        return
    # fork is cheap and inherits imports; the tokenizers library turns its own threads off
    # in forked children, which is what we want since processes are the parallelism here.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # Processes are the parallelism: workers inherit this and keep Rust single-threaded.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, _init_worker, (tok_spec, eod_token, dtype.str))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: collections.deque = collections.deque()
        for batch in batch_iter:
            pending.append((len(batch), pool.apply_async(_encode, (batch,))))
            if len(pending) >= 2 * workers:
                n, res = pending.popleft()
                yield n, res.get()
        while pending:
            n, res = pending.popleft()
            yield n, res.get()


def prepare(inputs: Sequence[str], output: str, tokenizer: str = "bytes", *,
            text_field: str = "text", split: str = "train", hf_config: str | None = None,
            streaming: bool = False, workers: int | None = None, invalid_utf8: str = "skip",
            eod_token: str | None = None, model_vocab_size: int | None = None,
            progress: bool = True, batch_chars: int = 1 << 20, encoder: str = "auto",
            shards: int = 1, slurm: SlurmOptions | None = None) -> PrepareResult:
    """Tokenize `inputs` into `output.bin/.idx` (+ `.tokenizer.json`, `.meta.json`).

    `tokenizer` is a tokenizer.json path, `bytes`, or `bpe:VOCAB` to train a byte-level BPE
    on the inputs first (one extra pass over them). `encoder`: auto (tiktoken where it gives
    tokenizers' ids, see neox.data.fast_bpe), tiktoken, or tokenizers. `shards` > 1 or `slurm`:
    prepare in pieces, `workers` processes at once or a Slurm array, and merge them
    (neox.data.shards).
    """
    if shards != 1 or slurm is not None:
        return prepare_sharded(inputs, output, tokenizer, shards=shards, workers=workers,
                               slurm=slurm, encoder=encoder, text_field=text_field,
                               invalid_utf8=invalid_utf8, eod_token=eod_token,
                               model_vocab_size=model_vocab_size, progress=progress)
    t0 = time.perf_counter()
    sources = resolve_inputs(list(inputs))
    read = dict(text_field=text_field, split=split, hf_config=hf_config, streaming=streaming,
                invalid_utf8=invalid_utf8)
    output = _check_output(output)  # before any reading or training: fail fast
    # A folder or glob that holds this output (a second run into the same folder) must not
    # read the output's own files back in as documents.
    own = {os.path.abspath(output + ext) for ext in (".bin", ".idx", ".meta.json",
                                                      ".tokenizer.json")}
    pieces = os.path.abspath(output) + ".shards" + os.sep  # of an interrupted --shards run
    sources = [s for s in sources if s.explicit or not (
        os.path.abspath(s.path) in own or os.path.abspath(s.path).startswith(pieces))]
    out = Path(output)
    tok_sidecar = Path(f"{output}.tokenizer.json")

    tok_tmp = temp_name(tok_sidecar)
    warnings: list[str] = []
    try:
        tok = make_tokenizer(tokenizer, lambda: iter_documents(sources, **read), eod_token,
                             progress, warnings, model_vocab_size)
        tok.save(tok_tmp)
        dtype = best_dtype(tok.vocab_size)
        # Workers load the tokenizer from the saved file; bytes needs no file.
        worker_spec = "bytes" if tok.name == "bytes" else str(tok_tmp)

        docs = ItemDocs(plan(sources, 1)[0], **read)
        stats = docs.stats
        total = sum(item.length for item in docs.items)
        with IndexedDatasetWriter(output, dtype) as writer, Progress(total, progress) as bar:
            used, counts = encode_into(writer, docs, tok, worker_spec, eod_token,
                                       encoder=encoder, workers=workers or 1, progress=bar,
                                       batch_chars=batch_chars, log=lambda m: _log(progress, m))
            bar.close()
            if writer.num_documents == 0:
                raise DataError(f"the inputs {' '.join(inputs)} hold no documents "
                                f"({stats.skipped_invalid_utf8} skipped as invalid UTF-8, "
                                f"{stats.skipped_empty_files} empty files); check them")
            result = PrepareResult(str(out), writer.num_documents, writer.num_tokens,
                                   time.perf_counter() - t0, tok.vocab_size, tok.eod_id,
                                   dtype.name, stats.skipped_invalid_utf8,
                                   stats.skipped_empty_files, warnings)
            meta = {**asdict(result), "inputs": list(inputs), "tokenizer": tokenizer,
                    "text_field": text_field, "files": stats.files, "encoder": used,
                    "bytes_read": counts.bytes_read}
            # Sidecars first; leaving this block renames the .bin, then the .idx, last.
            with atomic_path(f"{output}.meta.json") as meta_tmp:
                meta_tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tok_tmp, tok_sidecar)
    except OSError as e:  # the output side: inputs' read errors are DataErrors already
        raise DataError(f"cannot write the output {output}.* ({e.strerror or e}: "
                        f"{e.filename or out.parent}); choose a writable -o with free "
                        "space") from None
    finally:
        if tok_tmp.exists():
            tok_tmp.unlink()
    # The .bin/.idx and sidecars are in place now (the .idx renamed last of the data files).
    _log(progress, f"wrote {output}.bin/.idx: {bar.summary(used)}")
    return result


def _check_output(output: str) -> str:
    """The output prefix, `~` expanded, once its folder exists and can be written.

    A prefix naming a folder (`-o data/`) would write hidden files `.bin` and `.idx` in it.
    """
    prefix = Path(os.path.expanduser(output))
    if output.endswith(("/", os.sep)) or prefix.is_dir() or prefix.name in ("", ".", ".."):
        raise DataError(f"-o {output or repr(output)} is a folder; give a prefix for the "
                        "files, e.g. "
                        f"-o {prefix / 'corpus'} writes corpus.bin/.idx in it")
    folder = prefix.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(temp_name(prefix), "xb") as probe:  # os.access is not enough (root, ro mounts)
            os.unlink(probe.name)
    except OSError as e:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()),
                       None)
        why = f"{blocker} is a file" if blocker else f"{folder}: {e.strerror or e}"
        raise DataError(f"cannot write -o {output}: {why}; choose a writable folder") from None
    return str(prefix)


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[neox.data.prepare] {msg}", file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    """Warnings are shown even with --quiet: they say the result differs from what was asked."""
    print(f"[neox.data.prepare] warning: {msg}", file=sys.stderr, flush=True)


def make_tokenizer(spec: str, documents: Callable[[], Iterator[str]], eod_token: str | None,
                   progress: bool, warnings: list[str], model_vocab_size: int | None = None) -> Tokenizer:
    """Load `spec`, or for `bpe:VOCAB` train a byte-level BPE on the documents; refuse one larger than
    the model's padded vocab when that is given."""
    tok = _load_or_train(spec, documents, eod_token, progress, warnings)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise DataError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's "
                        f"padded vocab is {model_vocab_size}; use a smaller tokenizer or "
                        "a bigger model vocab")
    return tok


def _load_or_train(spec: str, documents: Callable[[], Iterator[str]], eod_token: str | None,
                   progress: bool, warnings: list[str]) -> Tokenizer:
    if not spec.startswith("bpe:"):
        return load_tokenizer(spec, eod_token)
    try:
        vocab = int(spec.split(":", 1)[1])
    except ValueError:
        raise DataError(f"tokenizer {spec!r}: write bpe:VOCAB_SIZE, e.g. bpe:32000") from None
    _log(progress, f"training a byte-level BPE (vocab {vocab}) on the inputs...")
    tok = train_bpe(documents(), vocab)
    if tok.vocab_size < vocab:
        warnings.append(f"the trained BPE has {tok.vocab_size} tokens, fewer than the {vocab} "
                        "asked: the inputs hold no more distinct merges; train on more text "
                        f"for a larger vocab (model.vocab_size >= {tok.vocab_size} fits this one)")
        _warn(warnings[-1])
    return tok


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m neox.data.prepare",
        description="Tokenize text into Megatron/GPT-NeoX-compatible .bin/.idx files.")
    p.add_argument("inputs", nargs="+", help="files, folders, globs (quoted), or "
                   "hf:<dataset name or local path>; .jsonl/.json/.parquet (optionally .gz/.zst)"
                   " or any other file as plain text (one document per file)")
    p.add_argument("-o", "--output", required=True, help="output prefix (writes PREFIX.bin/.idx)")
    p.add_argument("-t", "--tokenizer", default="bytes",
                   help="tokenizer.json path, 'bytes', or 'bpe:VOCAB' to train one on the inputs")
    p.add_argument("--text-field", default="text", help="JSON/parquet/datasets text field")
    p.add_argument("--split", default="train", help="datasets split (hf: inputs)")
    p.add_argument("--hf-config", default=None, help="datasets config name (hf: inputs)")
    p.add_argument("--streaming", action="store_true", help="stream the hf: dataset")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizers processes; 1 (default) tokenizes in this process with the "
                   "tokenizer's own threads on every core, which measured fastest on 2 cores "
                   "(the tiktoken encoder always uses threads). With --shards: pieces prepared "
                   "at once (default: one per core); with --slurm: array tasks at once")
    p.add_argument("--encoder", choices=ENCODERS, default="auto",
                   help="auto (default): tiktoken for byte-level BPEs it expresses exactly "
                   "(checked on the first documents), else tokenizers")
    p.add_argument("--shards", type=int, default=1, help="prepare in N pieces in parallel, "
                   "then merge them (same output); a re-run prepares only missing pieces")
    p.add_argument("--slurm", action="store_true",
                   help="prepare the pieces as a Slurm job array (submitit), then merge here")
    p.add_argument("--partition", default=None, help="Slurm partition (--slurm)")
    p.add_argument("--account", default=None, help="Slurm account (--slurm)")
    p.add_argument("--time-min", type=int, default=None,
                   help="time limit per piece in minutes (--slurm; default 60)")
    p.add_argument("--cpus-per-shard", type=int, default=None,
                   help="CPUs per piece (--slurm; default 2)")
    p.add_argument("--invalid-utf8", choices=("skip", "fail"), default="skip",
                   help="skip (and count) documents that are not valid UTF-8, or stop")
    p.add_argument("--eod-token", default=None, help="end-of-document token in the tokenizer "
                   "(default: the first of <|endoftext|>, </s>, ... it has)")
    p.add_argument("--model-vocab-size", type=int, default=None,
                   help="fail if the tokenizer's vocab exceeds the model's padded vocab")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        slurm = slurm_options(args)  # refuses Slurm flags without --slurm, before any work
        prepare(args.inputs, args.output, args.tokenizer, text_field=args.text_field,
                split=args.split, hf_config=args.hf_config, streaming=args.streaming,
                workers=args.workers, invalid_utf8=args.invalid_utf8,
                eod_token=args.eod_token, model_vocab_size=args.model_vocab_size,
                progress=not args.quiet, encoder=args.encoder, shards=args.shards,
                slurm=slurm)
    except NeoxError as e:
        print(f"neox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written under the final name", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

