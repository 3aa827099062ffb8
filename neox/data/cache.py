"""What is derived from prepared data and cached beside it (or in data.cache_dir).

Every cached file is keyed on the identity of the data it was derived from, so a prefix that is
prepared again never reuses stale values, even when its document and token counts are unchanged:
  index arrays   keyed on the .idx content (the arrays depend only on the sequence sizes)
  token range    keyed on the .idx content and the .bin's size and modification time
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from neox.data.fsutil import atomic_path
from neox.data.indexed import IndexedDataset, paths
from neox.errors import DataError

_CHUNK = 1 << 26  # tokens per pass when scanning a .bin, so memory stays flat


def cache_folder(prefix: str, cache_dir: str | None) -> Path:
    return Path(os.path.expanduser(cache_dir)) if cache_dir else Path(prefix).parent


def check_writable(folder: Path, *, must_write: bool = True,
                   setting: str = "data.cache_dir") -> None:
    """DataError when `folder` cannot be created (a file is in the way) or, if `must_write`,
    when files cannot be written in it; `setting` is what the user changes to fix it."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"cannot create the cache folder {folder}: {probe} is a file; set "
                        f"{setting} to a folder")
    if must_write and not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"cannot write the cache in {folder} ({probe} is not writable); set "
                        f"{setting} to a writable folder")


def token_range(data: IndexedDataset, folder: Path) -> tuple[int, int]:
    """(smallest, largest) token id in the data; (0, -1) when it holds no tokens.

    The first call reads the whole .bin; the result is cached in `folder`, and when the folder
    cannot be written (read-only data, no data.cache_dir) it is simply computed again next time.
    """
    stat = paths(data.prefix)[0].stat()
    key = hashlib.sha256(repr((data.identity, stat.st_size, stat.st_mtime_ns)).encode())
    path = folder / f"{Path(data.prefix).name}_{key.hexdigest()[:16]}_tokens.json"
    try:
        cached = json.loads(path.read_text())
        return int(cached["min_id"]), int(cached["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: compute it
    lo, hi = 0, -1
    tokens = data.all_tokens()
    for start in range(0, len(tokens), _CHUNK):
        chunk = tokens[start:start + _CHUNK]
        lo = int(chunk.min()) if start == 0 else min(lo, int(chunk.min()))
        hi = max(hi, int(chunk.max()))
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"min_id": lo, "max_id": hi}))
    except OSError:
        pass  # a cache we cannot write costs time, never correctness
    return lo, hi
