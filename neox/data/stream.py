"""Documents -> encoder -> `.bin`: reading, encoding and writing overlap, memory stays bounded.

With the tiktoken fast path (neox.data.fast_bpe) a reader thread parses documents into batches of
about 1 MB of text, a few threads encode them in small tasks (tiktoken releases the GIL, so they
run on every core) into numpy arrays, and the calling thread writes them in order. No Python list
of ids is ever made: each document's ids come out of tiktoken as a numpy buffer. At most five
batches are read or in flight, so memory does not grow with the corpus.

Before trusting the fast path, the first documents are encoded by both tiktoken and
`tokenizers`; on any difference the run continues with `tokenizers`, after one warning.
"""
from __future__ import annotations

import collections
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from neox.data.indexed import IndexedDatasetWriter
from neox.data.progress import Counts, Progress
from neox.data.tokenizer import HFTokenizer, Tokenizer
from neox.errors import DataError, NeoxError

ENCODERS = ("auto", "tiktoken", "tokenizers")
SAMPLE_CHARS = 1 << 18  # the first ~256K characters are encoded both ways before trusting tiktoken


@dataclass
class Batch:
    texts: list[str]
    wheres: list  # each document's place in the input, for Docs.describe
    counts: Counts  # totals read up to the end of this batch (tokens not yet)


class Docs:
    """What stream.encode_into reads: documents with their places, and the running counts."""

    def __iter__(self) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def counts(self) -> Counts:
        raise NotImplementedError

    def describe(self, where: object) -> str:
        """Where a document came from, e.g. `corpus.jsonl:12`."""
        raise NotImplementedError


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def batches(docs: Docs, max_chars: int = 1 << 20, max_docs: int = 4096) -> Iterator[Batch]:
    """Group documents into batches of about `max_chars` characters."""
    texts: list[str] = []
    wheres: list = []
    size = 0
    for text, where in docs:
        texts.append(text)
        wheres.append(where)
        size += len(text)
        if size >= max_chars or len(texts) >= max_docs:
            yield Batch(texts, wheres, docs.counts())
            texts, wheres, size = [], [], 0
    yield Batch(texts, wheres, docs.counts())  # maybe empty: it carries the final counts


def encode_into(writer: IndexedDatasetWriter, docs: Docs, tok: Tokenizer, tok_spec: str,
                eod_token: str | None, *, encoder: str = "auto", workers: int = 1,
                threads: int | None = None, progress: Progress | None = None,
                batch_chars: int = 1 << 20, log: Callable[[str], None] = lambda m: None
                ) -> tuple[str, Counts]:
    """Tokenize every document of `docs` into `writer`; (the encoder used, the counts).

    `tok_spec` loads `tok` again in worker processes (`workers` > 1, tokenizers only).
    Warnings are printed even when `log` is quiet.
    """
    if encoder not in ENCODERS:
        raise DataError(f"--encoder {encoder}: choose one of {', '.join(ENCODERS)}")
    threads = threads or cpu_count()
    stream = batches(docs, batch_chars)
    first = next(stream)
    fast, name = _choose(tok, encoder, first, writer.dtype, docs, log)
    pending = _chain(first, stream)
    if fast is not None:
        encoded = _fast_encoded(fast, tok.eod_id, writer.dtype, pending, threads)
    else:
        encoded = _tokenizers_encoded(tok, tok_spec, eod_token, writer.dtype, pending, workers)
    counts = first.counts
    try:
        for batch, flat, lengths in encoded:
            writer.add_documents(flat, lengths)
            counts = Counts(**vars(batch.counts))
            counts.tokens = writer.num_tokens
            if progress is not None:
                progress.update(counts)
    except _Failed as e:
        raise DataError(f"{docs.describe(e.where)}: the tokenizer cannot encode this document "
                        f"({_why(e.text, e.cause)}); fix or remove it") from None
    return name, counts


def _choose(tok: Tokenizer, encoder: str, first: Batch, dtype: np.dtype, docs: Docs,
            log: Callable[[str], None]):
    """(the FastBPE to use or None, the encoder's name)."""
    if encoder == "tokenizers" or not isinstance(tok, HFTokenizer):
        if encoder == "tiktoken":
            raise DataError(f"--encoder tiktoken: the {tok.name} tokenizer is not a byte-level "
                            "BPE; use --encoder auto")
        return None, "tokenizers" if isinstance(tok, HFTokenizer) else tok.name
    from neox.data import fast_bpe

    try:
        fast = fast_bpe.build(tok.tok)
        if fast.encoding.max_token_value > np.iinfo(dtype).max:
            raise fast_bpe.NotExpressible(f"ids up to {fast.encoding.max_token_value} do not "
                                          f"fit {dtype}")
    except (ImportError, fast_bpe.NotExpressible) as e:  # ImportError: tiktoken is missing
        if encoder == "tiktoken":
            raise DataError(f"--encoder tiktoken: tiktoken cannot express {tok.name} exactly "
                            f"({e}); use --encoder auto") from None
        log(f"encoder: tokenizers (tiktoken cannot express this tokenizer exactly: {e})")
        return None, "tokenizers"
    mismatch = _compare_sample(fast, tok, first, docs)
    if mismatch:
        if encoder == "tiktoken":
            raise DataError(f"--encoder tiktoken: tiktoken and tokenizers disagree on "
                            f"{mismatch}; use --encoder auto")
        print(f"[neox.data.prepare] warning: tiktoken and tokenizers disagree on {mismatch}; "
              "encoding with tokenizers instead (slower, same ids as before)", file=sys.stderr,
              flush=True)
        return None, "tokenizers"
    log("encoder: tiktoken (same ids as tokenizers, checked on the first documents)")
    return fast, "tiktoken"


def _compare_sample(fast, tok: HFTokenizer, first: Batch, docs: Docs) -> str | None:
    """Where tiktoken's ids differ from tokenizers' on the first documents; None if nowhere."""
    sample, size = [], 0
    for text, where in zip(first.texts, first.wheres):
        if size >= SAMPLE_CHARS:
            break
        if _encodable(text):  # one that is not is reported by the run itself, with its place
            sample.append((text, where))
            size += len(text)
    texts = [text for text, _ in sample]
    try:
        flat, lengths = fast.encode(texts, tok.eod_id, np.dtype(np.int64))
        ref = tok.tok.encode_batch_fast(texts, add_special_tokens=False)
    except Exception:  # neither encodes it: the run reports the document with its place
        return None
    ends = np.cumsum(lengths)
    for (_, where), enc, n, end in zip(sample, ref, lengths, ends):
        ours = flat[end - n:end - 1]
        if not np.array_equal(ours, enc.ids):
            k = next((j for j, (a, b) in enumerate(zip(ours, enc.ids)) if a != b),
                     min(len(ours), len(enc.ids)))
            return (f"{docs.describe(where)} (token {k}: tiktoken "
                    f"{ours[k] if k < len(ours) else 'ends'}, tokenizers "
                    f"{enc.ids[k] if k < len(enc.ids) else 'ends'})")
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chain(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest


class _Failed(Exception):
    def __init__(self, where: object, text: str, cause: BaseException) -> None:
        self.where, self.text, self.cause = where, text, cause


def _why(text: str, cause: BaseException) -> str:
    """Why a document cannot be encoded: a lone surrogate (what JSON's "\\ud800" decodes to is
    not Unicode text, and no tokenizer takes it), or the tokenizer's own first line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"it holds the lone surrogate {text[e.start]!r} at character {e.start}, which is "
                "not text: a \\u escape of half a UTF-16 pair in the JSON?")
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"


def _fast_encoded(fast, eod_id: int, dtype: np.dtype, pending: Iterator[Batch], threads: int
                  ) -> Iterator[tuple[Batch, np.ndarray, np.ndarray]]:
    """(batch, flat ids, lengths) in input order.

    Each batch is cut into tasks of about TASK_CHARS characters and up to three batches' tasks
    are queued, so the `threads` encoders always have work: on a busy machine one that the OS
    leaves waiting holds up one small task, not a whole batch. Measured on the shared 2-core
    box at load 7-11, medians of 6 interleaved runs on 14.5 M tokens: 4.6 s with these tasks,
    8.8 s with one task per 1 MB batch, for the same CPU time.
    """
    from neox.data.prepare import _read_ahead

    with ThreadPoolExecutor(threads, thread_name_prefix="neox-encode") as pool:
        inflight: collections.deque = collections.deque()
        try:
            for batch in _read_ahead(pending, depth=2):
                inflight.append((batch, [(a, pool.submit(fast.encode, batch.texts[a:b], eod_id,
                                                         dtype)) for a, b in _tasks(batch.texts)]))
                if len(inflight) > 2:
                    yield _collect(*inflight.popleft())
            while inflight:
                yield _collect(*inflight.popleft())
        finally:
            for _, tasks in inflight:
                for _, future in tasks:
                    future.cancel()


TASK_CHARS = 1 << 16


def _tasks(texts: list[str]) -> list[tuple[int, int]]:
    """[start, end) slices of `texts` of about TASK_CHARS characters each (at least one)."""
    slices, start, size = [], 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= TASK_CHARS:
            slices.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(texts) or not slices:
        slices.append((start, len(texts)))
    return slices


def _collect(batch: Batch, tasks: list) -> tuple[Batch, np.ndarray, np.ndarray]:
    """A batch's tasks' results, in order, as one array of ids and one of lengths."""
    from neox.data.fast_bpe import DocumentError

    flats, lengths = [], []
    for start, future in tasks:
        try:
            flat, n = future.result()
        except DocumentError as e:
            i = start + e.index
            raise _Failed(batch.wheres[i], batch.texts[i], e.cause) from None
        flats.append(flat)
        lengths.append(n)
    return batch, np.concatenate(flats), np.concatenate(lengths)


def _tokenizers_encoded(tok: Tokenizer, tok_spec: str, eod_token: str | None, dtype: np.dtype,
                        pending: Iterator[Batch], workers: int
                        ) -> Iterator[tuple[Batch, np.ndarray, np.ndarray]]:
    """prepare's own tokenizers path, with each failure traced to its document."""
    from neox.data.prepare import _encoded_in_order

    given: collections.deque = collections.deque()

    def texts() -> Iterator[list[str]]:
        for batch in pending:
            given.append(batch)
            yield batch.texts

    try:
        for _, (flat, lengths) in _encoded_in_order(tok_spec, eod_token, dtype, texts(), workers):
            yield given.popleft(), flat, lengths
    except NeoxError:
        raise
    except Exception:  # the tokenizer failed on the oldest batch still in flight
        if not given:
            raise
        for text, where in zip(given[0].texts, given[0].wheres):
            try:
                tok.encode_batch([text])
            except Exception as doc_error:
                raise _Failed(where, text, doc_error) from None
        raise  # no single document fails: not the input's fault
