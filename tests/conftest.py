"""Project-wide test setup: one embedded-corpus cache per checkout, one thread per CPU worker."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built once (~20 s) and reused by every test that trains on the embedded corpus.
os.environ.setdefault("NEOX_CACHE", str(REPO / ".cache" / "neox-test"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def embedded_ready() -> None:
    """Build the embedded corpus once before tests that train on it."""
    from neox.data.embedded import ensure_embedded

    ensure_embedded(8192, quiet=True)
