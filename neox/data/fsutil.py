"""Atomic file writes: write under a temp name in the same folder, then rename.

A rename within one filesystem is atomic, so a reader (or a second process racing us) sees
either no file or the whole file, never half of one. An interrupted run leaves only a
`.tmp-*` file behind, never a corrupt file under the final name.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np


def temp_name(final: str | Path) -> Path:
    """A unique sibling of `final` (same folder, so the rename stays on one filesystem)."""
    final = Path(final)
    return final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success rename it to `final`, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
