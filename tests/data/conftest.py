"""Shared fixtures for the data tests: synthetic corpora and the embedded corpus (built once)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neox.data.indexed import IndexedDatasetWriter


@pytest.fixture(scope="session")
def embedded_cache() -> Path:
    """The NEOX_CACHE holding the embedded corpus, built at most once per test session.

    It uses the cache the session is configured with ($NEOX_CACHE, else ~/.cache/neox), the
    same one the project-wide fixtures use, so the corpus is never built twice; a project
    conftest that points NEOX_CACHE at a temp folder isolates the whole suite at once.
    """
    from neox.data.embedded import cache_root, ensure_embedded

    ensure_embedded(8192, quiet=True)
    return cache_root()


def _random_docs(n: int, seed: int = 0, max_len: int = 200, vocab: int = 1000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


def _write_docs(prefix: Path, docs: list[np.ndarray], dtype=np.uint16) -> str:
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


@pytest.fixture
def small_corpus(tmp_path: Path) -> tuple[str, list[np.ndarray]]:
    """200 random documents of 1..199 tokens, written to tmp_path/corpus.{bin,idx}."""
    docs = _random_docs(200)
    return _write_docs(tmp_path / "corpus", docs), docs


# Helpers handed to tests as fixtures (importing from conftest is fragile across import modes).
@pytest.fixture(scope="session")
def random_docs():
    """random_docs(n, seed=0, max_len=200, vocab=1000) -> list of int arrays."""
    return _random_docs


@pytest.fixture(scope="session")
def write_docs():
    """write_docs(prefix, docs, dtype=np.uint16) -> prefix as str."""
    return _write_docs
