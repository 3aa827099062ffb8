"""logging.progress: the embedded corpus shows a progress bar while it tokenizes, and none without it."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from neox.data import embedded


@pytest.fixture
def small_stdlib(tmp_path, monkeypatch):
    """Eight stdlib files instead of all of them, and a cache of this test's own."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    monkeypatch.setattr(embedded, "stdlib_files", lambda: files)
    monkeypatch.setenv("NEOX_CACHE", str(tmp_path / "cache"))
    return files


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_while_tokenizing(small_stdlib, capsys, progress):
    corpus = embedded.ensure_embedded(300, progress=progress)
    err = capsys.readouterr().err
    assert ("tokenizing" in err and f"{len(small_stdlib)}/{len(small_stdlib)}" in err) == progress, err
    assert corpus is not None
