"""Output directories written whole or not at all: into a hidden sibling, then renamed into place."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from neox.errors import ConfigError


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an output that is a file or a non-empty directory (unless `force`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; choose another output directory or pass --force "
                          "to replace it")


def _readable(root: Path) -> None:
    """Give the files the modes a plain write would (mkdtemp and some writers make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, names in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for n in names:
            os.chmod(os.path.join(dirpath, n), 0o666 & ~umask)


@contextlib.contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; when the block succeeds it replaces `out`, when it
    raises it is removed and `out` is left as it was."""
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _readable(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "dir")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
