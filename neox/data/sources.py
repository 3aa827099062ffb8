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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from neox.errors import DataError

HF_PREFIX = "hf:"
_JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class ReadStats:
    documents: int = 0
    skipped_invalid_utf8: int = 0
    skipped_empty_files: int = 0
    files: int = 0
    notes: list[str] = field(default_factory=list)


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


def _open(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"reading {path} needs the zstandard package; "
                            "`pip install zstandard` or decompress the file first") from None
        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(stream)  # gives it line iteration
    return open(path, "rb")


def _kind(path: str) -> str:
    name = path.removesuffix(".gz").removesuffix(".zst")
    if name.endswith(_JSON_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _decode(raw: bytes, where: str, invalid_utf8: str, stats: ReadStats) -> str | None:
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
                   invalid_utf8: str = "skip", stats: ReadStats | None = None) -> Iterator[str]:
    """Every document of every source, in order."""
    if invalid_utf8 not in ("skip", "fail"):
        raise DataError(f"invalid_utf8={invalid_utf8!r}; use 'skip' or 'fail'")
    stats = stats if stats is not None else ReadStats()
    for src in sources:
        stats.files += 1
        if src.hf:
            docs = _iter_hf(src.path, text_field, split, hf_config, streaming)
        else:
            if os.path.getsize(src.path) == 0:
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


def _iter_text_file(path: str, invalid_utf8: str, stats: ReadStats) -> Iterator[str]:
    with _open(path) as f:
        text = _decode(f.read(), path, invalid_utf8, stats)
    if text is not None:
        yield text


def _iter_jsonl(path: str, text_field: str, invalid_utf8: str,
                stats: ReadStats) -> Iterator[str]:
    with _open(path) as raw:
        for n, line in enumerate(raw, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            text = _decode(line, where, invalid_utf8, stats)
            if text is None:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}); fix or remove the "
                                "line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{where} has no string field {text_field!r}; pass "
                                "--text-field with the name of the text field")
            yield obj[text_field]


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); pass --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
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
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise DataError(f"cannot load dataset {name!r} split {split!r} ({e}); check the "
                        "name, --hf-config and --split") from None
    features = getattr(ds, "column_names", None)
    if features is not None and text_field not in features:
        raise DataError(f"dataset {name} has no field {text_field!r} (fields: "
                        f"{', '.join(features)}); pass --text-field")
    for i, example in enumerate(ds):
        text = example.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"dataset {name} example {i} has no string field {text_field!r}; "
                            "pass --text-field")
        yield text
