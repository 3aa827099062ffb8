"""The default corpus: this machine's Python standard library source, tokenized once and cached.

It needs no download, is about 12 MB of real code on any machine with Python, and trains a
small model to visibly lower loss, which makes it a good smoke-test and tutorial corpus.
Everything lives under `$NEOX_CACHE/embedded/<key>/` (default `~/.cache/neox`), where the key
hashes the Python version, the file list with sizes, and the vocab size. The folder is built
under a temp name and renamed into place, so processes racing to build it are safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from neox.data.indexed import IndexedDatasetWriter, best_dtype, exists
from neox.data.tokenizer import encode_documents, train_bpe
from neox.errors import DataError

FORMAT = 1  # bump when the recipe below changes, so old caches are not reused
# Third-party packages are not the standard library; test suites are skipped because they are
# half the size and full of deliberately odd files (bad encodings, huge literals).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class EmbeddedCorpus:
    prefix: str  # .bin/.idx prefix
    tokenizer_path: str
    vocab_size: int
    eod_id: int
    meta: dict


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("NEOX_CACHE", "~/.cache/neox")))


def stdlib_files() -> list[Path]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]  # prune: never walk into them
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(found)


def _key(files: list[Path], vocab_size: int) -> str:
    h = hashlib.sha256(f"{FORMAT}|{sys.version}|{vocab_size}".encode())
    for p in files:
        h.update(f"{p}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def corpus_dir(vocab_size: int) -> Path:
    """Where the corpus for this vocab lives (cheap: lists files, reads nothing)."""
    return cache_root() / "embedded" / _key(stdlib_files(), vocab_size)


def load_embedded(vocab_size: int) -> EmbeddedCorpus | None:
    """The cached corpus, or None when it has not been built yet."""
    folder = corpus_dir(vocab_size)
    meta_path = folder / "meta.json"
    if not (meta_path.exists() and exists(folder / "data")):
        return None
    meta = json.loads(meta_path.read_text())
    return EmbeddedCorpus(str(folder / "data"), str(folder / "tokenizer.json"),
                          meta["vocab_size"], meta["eod_id"], meta)


def ensure_embedded(vocab_size: int = 8192, *, quiet: bool = False, progress: bool = False) -> EmbeddedCorpus:
    """Build the corpus if it is not cached yet, and return it (`progress`: a bar while tokenizing)."""
    cached = load_embedded(vocab_size)
    if cached is not None:
        return cached
    say = (lambda msg: None) if quiet else (lambda msg: print(f"[neox.data] {msg}", flush=True))
    files = stdlib_files()
    final = cache_root() / "embedded" / _key(files, vocab_size)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # a file in the way, a read-only home
        raise DataError(f"cannot build the embedded corpus in {final.parent} ({e.strerror}); "
                        "set NEOX_CACHE to a writable folder") from None
    try:
        t0 = time.perf_counter()
        texts, skipped = [], 0
        for p in files:
            try:
                texts.append(p.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:  # a few stdlib files may be Latin-1; not worth guessing
                skipped += 1
        n_bytes = sum(len(t) for t in texts)
        say(f"embedded corpus: {len(texts)} stdlib .py files ({n_bytes / 1e6:.1f} MB, "
            f"{skipped} skipped as non-UTF-8) -> {final}")
        say(f"training a byte-level BPE with vocab {vocab_size}...")
        tok = train_bpe(texts, vocab_size)
        tok.save(tmp / "tokenizer.json")
        say("tokenizing...")
        with IndexedDatasetWriter(tmp / "data", best_dtype(tok.vocab_size)) as w:
            bar = tqdm(total=len(texts), unit="file", desc="tokenizing", disable=quiet or not progress)
            for start in range(0, len(texts), 256):
                w.add_documents(*encode_documents(tok, texts[start:start + 256]))
                bar.update(len(texts[start:start + 256]))
            bar.close()
            n_tokens, n_docs = w.num_tokens, w.num_documents
        meta = {"format": FORMAT, "python": sys.version, "files": len(texts),
                "skipped_non_utf8": skipped, "bytes": n_bytes, "documents": n_docs,
                "tokens": n_tokens, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if load_embedded(vocab_size) is None:
                raise
        say(f"embedded corpus ready: {n_docs} docs, {n_tokens / 1e6:.2f} M tokens "
            f"in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = load_embedded(vocab_size)
    assert result is not None
    return result
