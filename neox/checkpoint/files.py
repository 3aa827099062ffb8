"""Durable files: fsync, atomic replace, and the manifest (sizes + sha256) written with each checkpoint.

A checkpoint directory is complete exactly when its `manifest.json` exists: the manifest is written
(and fsynced) after every shard is on disk, and only then is the directory renamed to its final tag.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def list_files(root: Path) -> List[str]:
    """Every regular file under root, as sorted posix paths relative to root (the manifest excluded)."""
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def digest(path: Path, fsync: bool = False) -> Dict[str, object]:
    """Size and sha256 of a file; with fsync, also force it to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def digest_files(root: Path, rels: Iterable[str], fsync: bool = False) -> Dict[str, Dict[str, object]]:
    return {rel: digest(root / rel, fsync=fsync) for rel in rels}


def write_manifest(root: Path, files: Dict[str, Dict[str, object]], meta: Dict[str, object]) -> None:
    manifest = {"format": FORMAT, **meta, "files": dict(sorted(files.items()))}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(root: Path) -> Optional[dict]:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} has no file list")
    return manifest


def check_sizes(root: Path, manifest: dict) -> List[str]:
    """Cheap checks: every listed file exists with its recorded size. Returns the problems."""
    problems = []
    for rel, want in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            kind = "truncated" if size < want["size"] else "too long"
            problems.append(f"{rel} is {kind}: {size} bytes, manifest says {want['size']}")
    return problems


def check_digests(root: Path, manifest: dict, rels: Iterable[str]) -> List[str]:
    problems = []
    for rel in rels:
        want = manifest["files"][rel]
        path = root / rel
        if not path.is_file() or path.stat().st_size != want["size"]:
            continue  # reported by check_sizes
        got = digest(path)["sha256"]
        if got != want["sha256"]:
            problems.append(f"{rel} is corrupt: sha256 {got[:12]}..., manifest says {want['sha256'][:12]}...")
    return problems


# torch's writer reports a full disk as an error of its zip container, not as ENOSPC
WRITE_FAILURE_MARKS = ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed",
                        "No space left", "Disk quota")


def is_write_failure(exc: RuntimeError) -> bool:
    return any(mark in str(exc) for mark in WRITE_FAILURE_MARKS)


def free_space(directory: Path) -> str:
    """How much room the checkpoint's file system has left, for the error message."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**30:.1f} GiB free on that file system"
