"""Where documents come from: local files and globs, or a Hugging Face `datasets` source.

Local files, by how their name ends (optionally also `.gz` or `.zst`):
  .jsonl / .json  one JSON object per line; the document is its `text_field`
  .parquet        one document per row of the `text_field` column
  anything else   plain text, one document per file (.txt, .py, .md, ...)
`hf:NAME_OR_PATH` reads through `datasets`: a hub name, a local data folder, or a folder
written by `save_to_disk`; local paths need no network.

Invalid UTF-8 is skipped and counted by default (`invalid_utf8="skip"`) or fails the run
(`"fail"`); it never reaches the tokenizer as replacement characters.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from neox.data.progress import Counts
from neox.errors import DataError

HF_PREFIX = "hf:"
_JSON_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Source:
    """One input: a local file, or a `datasets` source."""

    path: str
    hf: bool = False
    explicit: bool = True  # named on the command line (not found by a glob or folder walk)


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand globs and folders into files, sorted, so every run reads the same order."""
    sources: list[Source] = []
    for spec in inputs:
        if spec.startswith(HF_PREFIX):
            sources.append(Source(spec[len(HF_PREFIX):], hf=True))
            continue
        path = Path(os.path.expanduser(spec))
        if path.is_file():
            sources.append(Source(str(path)))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            if not files:
                raise DataError(f"input folder {spec} holds no files; check the path")
            sources += [Source(str(p), explicit=False) for p in files]
        elif glob.has_magic(spec):
            files = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True)
                           if os.path.isfile(p))
            if not files:
                raise DataError(f"input glob {spec} matches no files; check the pattern "
                                "(quote it so the shell does not expand it)")
            sources += [Source(p, explicit=False) for p in files]
        else:
            raise DataError(f"input {spec} does not exist; give a file, folder, glob, or "
                            "hf:<dataset name or path>")
    return sources


# Compressed inputs by name, and the bytes every such file starts with.
_COMPRESSED = {".gz": ("gzip", b"\x1f\x8b"), ".zst": ("zstd", b"\x28\xb5\x2f\xfd")}


def _open(path: str) -> IO[bytes]:
    """The file's bytes, decompressed by its name; DataError when the name does not match."""
    suffix = next((s for s in _COMPRESSED if path.endswith(s)), None)
    raw = open(path, "rb")
    if suffix is None:
        return raw
    kind, magic = _COMPRESSED[suffix]
    head = raw.read(len(magic))
    raw.seek(0)
    if head != magic:
        raw.close()
        raise DataError(f"{path} is named {suffix} but is not {kind}-compressed (it starts with "
                        f"{head!r}); rename it without {suffix}, or compress it with {kind}")
    if kind == "gzip":
        return gzip.open(raw, "rb")
    return io.BufferedReader(_ZstdReader(raw))  # buffered: gives it line iteration


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file frame after frame, raising EOFError when it ends mid-frame (as
    gzip does): zstandard's own stream reader returns a truncated file's bytes silently."""

    def __init__(self, raw: IO[bytes]) -> None:
        try:
            import zstandard
        except ImportError:
            raise DataError(f"reading {raw.name} needs the zstandard package; "
                            "`pip install zstandard` or decompress the file first") from None
        self._zstd = zstandard
        self._raw = raw
        self._dec = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the zstd stream ended before the end of its last frame")
                return 0
            self._pending = self._decompress(chunk)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            try:
                out.append(self._dec.decompress(chunk))
            except self._zstd.ZstdError as e:
                raise OSError(f"corrupt zstd data: {e}") from None
            self._in_frame = not self._dec.eof
            if not self._dec.eof:
                break
            chunk = self._dec.unused_data  # the next frame, if any
            self._dec = self._zstd.ZstdDecompressor().decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_error(path: str, e: BaseException, line: int | None = None) -> DataError:
    """One line for an input that cannot be read to its end."""
    at = f" after line {line}" if line else ""
    if isinstance(e, EOFError):
        return DataError(f"{path} is truncated: its compressed data ends early{at}; download or "
                         "compress it again")
    if isinstance(e, PermissionError):
        return DataError(f"{path} cannot be read (permission denied); fix its permissions or "
                         "drop it from the inputs")
    return DataError(f"{path} cannot be read{at} ({_one_line(e)}); the file is damaged, replace "
                     "it or drop it from the inputs")


def _kind(path: str) -> str:
    name = path.removesuffix(".gz").removesuffix(".zst")
    if name.endswith(_JSON_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _decode(raw: bytes, where: str, invalid_utf8: str, stats: Counts) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if invalid_utf8 == "fail":
            raise DataError(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                            "fix the file or run with --invalid-utf8 skip") from None
        stats.skipped_invalid_utf8 += 1
        return None


def iter_documents(sources: list[Source], *, text_field: str = "text", split: str = "train",
                   hf_config: str | None = None, streaming: bool = False,
                   invalid_utf8: str = "skip", stats: Counts | None = None) -> Iterator[str]:
    """Every document of every source, in order."""
    if invalid_utf8 not in ("skip", "fail"):
        raise DataError(f"invalid_utf8={invalid_utf8!r}; use 'skip' or 'fail'")
    stats = stats if stats is not None else Counts()
    for src in sources:
        stats.files += 1
        if src.hf:
            docs = _iter_hf(src.path, text_field, split, hf_config, streaming)
        else:
            try:
                size = os.path.getsize(src.path)
            except OSError as e:
                raise _read_error(src.path, e) from None
            if size == 0:
                if src.explicit:
                    raise DataError(f"input file {src.path} is empty; remove it from the inputs")
                stats.skipped_empty_files += 1
                continue
            kind = _kind(src.path)
            if kind == "jsonl":
                docs = _iter_jsonl(src.path, text_field, invalid_utf8, stats)
            elif kind == "parquet":
                docs = _iter_parquet(src.path, text_field)
            else:
                docs = _iter_text_file(src.path, invalid_utf8, stats)
        for doc in docs:
            stats.documents += 1
            yield doc


def _iter_text_file(path: str, invalid_utf8: str, stats: Counts) -> Iterator[str]:
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e) from None
    text = _decode(raw, path, invalid_utf8, stats)
    if text is not None:
        yield text.removeprefix("\ufeff")  # a byte-order mark is no part of the text


def _iter_jsonl(path: str, text_field: str, invalid_utf8: str,
                stats: Counts) -> Iterator[str]:
    n = 0
    try:
        with _open(path) as raw:
            for n, line in enumerate(raw, start=1):
                yield from _json_doc(line, f"{path}:{n}", text_field, invalid_utf8, stats)
    except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, e, n) from None


def _json_doc(line: bytes, where: str, text_field: str, invalid_utf8: str,
              stats: Counts) -> Iterator[str]:
    """The document of one JSON line (nothing for a blank line or skipped invalid UTF-8)."""
    if not line.strip():
        return
    text = _decode(line, where, invalid_utf8, stats)
    if text is None:
        return
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.strip() in ("[", "{"):  # one pretty-printed document, not JSON Lines
            raise DataError(f"{where} opens a multi-line JSON document; inputs named .json or "
                            ".jsonl must hold one JSON object per line (JSON Lines): convert it, "
                            "e.g. jq -c '.[]' IN > OUT.jsonl") from None
        raise DataError(f"{where} is not valid JSON ({e.msg}); fix or remove the "
                        "line") from None
    if isinstance(obj, list):
        raise DataError(f"{where} is a JSON array; inputs named .json or .jsonl must hold one "
                        "JSON object per line (JSON Lines): convert it, e.g. jq -c '.[]' IN > "
                        "OUT.jsonl")
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise DataError(f"{where} has no string field {text_field!r}; pass "
                        "--text-field with the name of the text field")
    yield obj[text_field]


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path} is not a readable parquet file ({_one_line(e)})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); pass --text-field")
    row = 0
    batches = pf.iter_batches(columns=[text_field], batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group: ArrowInvalid, OSError, ...
            raise DataError(f"{path} cannot be read after row {row} ({_one_line(e)}); the "
                            "file is damaged, replace it or drop it from the inputs") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise DataError(f"{path} row {row}: {text_field!r} is {type(text).__name__}, "
                                "not text; clean the column or pass another --text-field")
            yield text


def _iter_hf(name: str, text_field: str, split: str, config: str | None,
             streaming: bool) -> Iterator[str]:
    import datasets

    local = Path(os.path.expanduser(name))
    try:
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(local))  # written by save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else name, config,
                                       split=split, streaming=streaming)
    except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError,
        # ValueError for a missing config or split): each means this input cannot be read
        raise DataError(f"dataset {name!r} (split {split!r}) could not be found locally or "
                        f"downloaded ({_one_line(e)}); check the name, --hf-config, --split "
                        "and the network, or give a local folder as hf:<path>") from None
    features = getattr(ds, "column_names", None)
    if features is not None and text_field not in features:
        raise DataError(f"dataset {name} has no field {text_field!r} (fields: "
                        f"{', '.join(features)}); pass --text-field")
    examples, i = iter(ds), 0
    while True:
        try:
            example = next(examples, None)
        except Exception as e:  # a stream that breaks off midway (network, damaged shard)
            raise DataError(f"dataset {name} failed after example {i} ({_one_line(e)}); run "
                            "again, or save it locally first") from None
        if example is None:
            return
        i += 1
        text = example.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"dataset {name} example {i - 1} has no string field "
                            f"{text_field!r}; pass --text-field")
        yield text


def _one_line(e: BaseException) -> str:
    """`Type: first line of the message`, for errors from libraries with long messages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
