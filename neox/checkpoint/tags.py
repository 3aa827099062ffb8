"""Names in a checkpoints directory: `step_XXXXXXXX` tags, `<tag>.partial` saves in progress, and the
`latest` file naming the checkpoint to resume from."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Tuple

TAG_PREFIX = "step_"
PARTIAL = ".partial"
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def read_latest(directory: Path) -> Tuple[Optional[str], Optional[str]]:
    """(tag, None) from `<directory>/latest`, or (None, what is wrong with it: missing, empty, ...)."""
    path = Path(directory) / "latest"
    # os.path's tests: False, not an OSError, for a path that cannot be looked up (e.g. a name too long)
    if not os.path.lexists(path):
        return None, "missing"
    if os.path.isdir(path):
        return None, "a directory, not the file naming the checkpoint to resume from"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"not text ({len(raw)} bytes of binary data)"
    if not tag:
        return None, "empty"
    if "/" in tag or "\0" in tag or "\n" in tag or tag in (".", ".."):
        return None, f"not a checkpoint name ({tag[:60]!r})"
    return tag, None
