"""Fixtures for the Hugging Face conversion tests; the helpers live in tests/hf_helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from hf_helpers import RUNS, exported, runs_root, trained


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    return runs_root(tmp_path_factory)


@pytest.fixture(scope="session", params=sorted(RUNS))
def run_and_export(request, shared_root, embedded_ready) -> tuple[Path, Path]:
    """(a tiny run saved under tp=2 or pp=2, its to-hf export), for both model families."""
    run = trained(request.param, shared_root)
    return run, exported(run, shared_root)
