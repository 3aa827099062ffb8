"""Tokenized documents on disk: a `.bin` of raw tokens and an `.idx` that says where each starts.

The format is Megatron / GPT-NeoX `MMIDIDX` version 1, byte for byte, so files prepared by
either tool load in the other. The `.idx` layout (little-endian):

    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    <Q       version, always 1
    <B       dtype code of the tokens (DTYPE_CODES below)
    <Q       n: number of sequences
    <Q       d: length of the document index
    int32[n] sizes: tokens in each sequence
    int64[n] pointers: BYTE offset of each sequence in the .bin
    int64[d] doc_idx: sequence index where each document starts, then n (so d = docs + 1)

Files we write hold one sequence per document (doc_idx = 0..n). GPT-NeoX files prepared with
sentence splitting hold several sequences per document; like GPT-NeoX's sampler, we sample over
sequences and call them documents.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from neox.data.fsutil import temp_name
from neox.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8

# Megatron-Core's table. GPT-NeoX's older table differs only at 7, which it reads as float64;
# token files are never float, so the difference never matters in practice.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron and GPT-NeoX pick for a vocab: uint16 below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def paths(prefix: str | Path) -> tuple[Path, Path]:
    """(`prefix.bin`, `prefix.idx`)."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def exists(prefix: str | Path) -> bool:
    return all(p.exists() for p in paths(prefix))


class IndexedDatasetWriter:
    """Write documents to `prefix.bin/.idx` atomically.

        with IndexedDatasetWriter("data/corpus", best_dtype(vocab)) as w:
            w.add_document(tokens)

    Both files are written under temp names and renamed only when the block exits cleanly;
    the `.idx` is renamed last, so a reader never finds an `.idx` describing a partial `.bin`.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"token dtype {self.dtype} has no MMIDIDX code; use one of "
                            f"{sorted(str(d) for d in _CODE_OF)}")
        self.bin_path, self.idx_path = paths(prefix)
        self._tmp_bin = temp_name(self.bin_path)
        self._file: BinaryIO | None = None
        self._sizes: list[np.ndarray] = []  # chunks of int32 sizes, one chunk per add call
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self.num_tokens = 0

    def __enter__(self) -> IndexedDatasetWriter:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp_bin, "wb")
        return self

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([tokens.size], dtype=np.int64))

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: their tokens concatenated, and their lengths."""
        if self._file is None:
            raise RuntimeError("use IndexedDatasetWriter as a context manager")
        flat_tokens = np.asarray(flat_tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != flat_tokens.size:
            raise ValueError("lengths do not add up to the number of tokens")
        if flat_tokens.size and self._limits is not None and flat_tokens.dtype != self.dtype:
            lo, hi = flat_tokens.min(), flat_tokens.max()
            if lo < self._limits.min or hi > self._limits.max:
                raise DataError(f"token id {hi if hi > self._limits.max else lo} does not fit "
                                f"{self.dtype}; write with a wider dtype (int32)")
        if (lengths > np.iinfo(np.int32).max).any():
            raise DataError("a document has more than 2^31 tokens; split it before writing")
        self._file.write(flat_tokens.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(lengths.astype(np.int32))
        self.num_tokens += int(flat_tokens.size)

    @property
    def num_documents(self) -> int:
        return sum(len(s) for s in self._sizes)

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._file is not None
        self._file.close()
        try:
            if exc_type is None:
                self._finalize()
        finally:
            if self._tmp_bin.exists():
                self._tmp_bin.unlink()

    def _finalize(self) -> None:
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        write_index(self.idx_path, self.dtype, sizes, bin_tmp=self._tmp_bin,
                    bin_final=self.bin_path)


def write_index(idx_path: Path, dtype: np.dtype, sizes: np.ndarray, *,
                bin_tmp: Path | None = None, bin_final: Path | None = None) -> None:
    """Write an `.idx` for `sizes` (one document per sequence) atomically.

    When `bin_tmp` is given it is renamed to `bin_final` just before the `.idx` appears.
    """
    sizes = np.asarray(sizes, dtype=np.int32)
    n = len(sizes)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    tmp = temp_name(idx_path)
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", _CODE_OF[np.dtype(dtype)]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
        if bin_tmp is not None and bin_final is not None:
            os.replace(bin_tmp, bin_final)
        os.replace(tmp, idx_path)
    finally:
        if tmp.exists():
            tmp.unlink()


class IndexedDataset:
    """Read-only, memory-mapped view of `prefix.bin/.idx`.

    `ds[i]` is sequence i as a numpy view (no copy); `ds.get(i, offset, length)` a slice of it.
    Everything is checked on open, so a truncated or foreign file fails here with a DataError
    instead of yielding garbage tokens later.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        bin_path, idx_path = paths(prefix)
        missing = [p for p in (bin_path, idx_path) if not p.exists()]
        if len(missing) == 2:
            hint = ("; drop the extension" if self.prefix.endswith((".bin", ".idx"))
                    and exists(self.prefix[:-4]) else "")
            raise DataError(f"no prepared data at {self.prefix} (neither .bin nor .idx){hint}; "
                            "prepare it with `python -m neox.data.prepare` or fix the prefix")
        if missing:
            raise DataError(f"{missing[0]} is missing while its pair exists; re-run the "
                            "preparation (an interrupted run or a partial copy?)")
        self._identity: str | None = None
        try:
            self._read_index(idx_path)
            self._check_pointers(idx_path)
            self._open_bin(bin_path)
        except OSError as e:
            raise DataError(f"cannot read {e.filename or self.prefix} ({e.strerror or e}); check "
                            "the file and its permissions") from None

    def _read_index(self, idx_path: Path) -> None:
        file_size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise DataError(f"{idx_path} is {file_size} bytes, shorter than the MMIDIDX header; "
                            "the file is truncated, re-run the preparation")
        if header[:9] != MAGIC:
            raise DataError(f"{idx_path} does not start with the MMIDIDX magic (found "
                            f"{header[:9]!r}); it is not a Megatron/GPT-NeoX mmap index")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != VERSION:
            raise DataError(f"{idx_path} has MMIDIDX version {version}; only version 1 is "
                            "supported, re-prepare the data")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path} has unknown dtype code {code}; known codes are "
                            f"{sorted(DTYPE_CODES)}")
        n, d = struct.unpack_from("<QQ", header, 18)
        need = HEADER_SIZE + 4 * n + 8 * n + 8 * d
        if file_size < need:
            raise DataError(f"{idx_path} is {file_size} bytes but its header announces "
                            f"{n} sequences ({need} bytes); the file is truncated, re-prepare")
        self.dtype = DTYPE_CODES[code]
        if n == 0:  # np.memmap refuses to map an empty range
            self.sizes = np.zeros(0, np.int32)
            self.pointers = np.zeros(0, np.int64)
            self.doc_idx = np.fromfile(idx_path, np.int64, count=d, offset=HEADER_SIZE)
            return
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(buf, np.int32, count=n, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(buf, np.int64, count=n, offset=HEADER_SIZE + 4 * n)
        self.doc_idx = np.frombuffer(buf, np.int64, count=d, offset=HEADER_SIZE + 12 * n)
        if (self.sizes < 0).any():
            raise DataError(f"{idx_path} has negative sequence sizes; the file is corrupt")

    def _check_pointers(self, idx_path: Path) -> None:
        """Every upstream writer stores pointers as the running sum of sizes x item size; when they
        advance by another item size, the dtype code is wrong and the tokens would be misread."""
        n = len(self.sizes)
        if not n:
            return
        step = np.zeros(n, np.int64)
        np.cumsum(self.sizes[:-1], dtype=np.int64, out=step[1:])  # tokens before each sequence
        if np.array_equal(self.pointers, step * self.dtype.itemsize):
            return
        code = _CODE_OF[self.dtype]
        fits = [s for s in (1, 2, 4, 8) if np.array_equal(self.pointers, step * s)]
        if fits:
            raise DataError(f"{idx_path} says dtype code {code} ({self.dtype}, "
                            f"{self.dtype.itemsize} bytes/token) but its pointers advance "
                            f"{fits[0]} bytes/token: the dtype code disagrees with the pointers "
                            "and the tokens would be misread; re-prepare the data")
        k = int(np.flatnonzero(self.pointers != step * self.dtype.itemsize)[0])
        raise DataError(f"{idx_path}: sequence {k} starts at byte {int(self.pointers[k])} but "
                        f"the sizes before it put it at {int(step[k]) * self.dtype.itemsize} "
                        f"({self.dtype} tokens); the pointers are corrupt, re-prepare the data")

    def _open_bin(self, bin_path: Path) -> None:
        bin_size = bin_path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize  # pointers checked: the data's end
        fits = [s for s in (1, 2, 4, 8) if bin_size == self.num_tokens * s]
        if bin_size != expected and fits:  # e.g. one sequence, so no pointer tells
            raise DataError(f"{self.prefix}.idx says dtype code {_CODE_OF[self.dtype]} "
                            f"({self.dtype}) but {bin_path} holds {fits[0]} bytes per token: the "
                            "dtype code disagrees with the data; re-prepare the data")
        if bin_size < expected:
            raise DataError(f"{self.prefix}.idx points to byte {expected} but {bin_path} has "
                            f"{bin_size} bytes; the .bin is truncated or belongs to another "
                            "index, re-prepare")
        if bin_size > expected:
            raise DataError(f"{bin_path} has {bin_size} bytes but {self.prefix}.idx describes "
                            f"{expected}; the .bin belongs to another index (mixed or partial "
                            "copies), re-prepare or copy both files again")
        self._bin = (np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size
                     else np.zeros(0, np.uint8))

    @property
    def identity(self) -> str:
        """A hash of the .idx content: everything the sample index arrays are derived from."""
        if self._identity is None:
            h = hashlib.sha256()
            with open(paths(self.prefix)[1], "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            self._identity = h.hexdigest()[:16]
        return self._identity

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset+length` of sequence `i` (to its end when length is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} of a {size}-token sequence")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, count=length, offset=start)

    def all_tokens(self) -> np.ndarray:
        """Every token of the .bin, in order, as one memory-mapped array (no copy)."""
        return np.frombuffer(self._bin, self.dtype, count=self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))
