"""The embedded corpus: cache key, atomic build, and a lost race that must still succeed."""
from __future__ import annotations

from pathlib import Path

import pytest

from neox.data import embedded
from neox.data.indexed import IndexedDataset


@pytest.fixture
def tiny_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and a five-file 'stdlib', so builds take milliseconds."""
    files = []
    for i in range(5):
        f = tmp_path / "lib" / f"m{i}.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
        files.append(f)
    (tmp_path / "lib" / "bad.py").write_bytes(b"# caf\xe9\n")  # Latin-1: skipped, counted
    files.append(tmp_path / "lib" / "bad.py")
    monkeypatch.setenv("NEOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "stdlib_files", lambda: sorted(files))
    return tmp_path / "cache"


def test_build_then_cached(tiny_stdlib: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = embedded.ensure_embedded(270)
    out = capsys.readouterr().out
    assert "1 skipped as non-UTF-8" in out and str(tiny_stdlib) in out
    assert corpus.meta["documents"] == 5 and corpus.vocab_size == 270
    assert len(IndexedDataset(corpus.prefix)) == 5
    again = embedded.ensure_embedded(270)
    assert again == corpus and capsys.readouterr().out == ""
    assert embedded.corpus_dir(270) != embedded.corpus_dir(271)  # vocab is in the key


def test_losing_a_build_race_is_fine(tiny_stdlib: Path, monkeypatch) -> None:
    first = embedded.ensure_embedded(270, quiet=True)
    # Pretend another process finished while we were building: our rename must fail cleanly.
    real = embedded.load_embedded
    calls = iter([None])
    monkeypatch.setattr(embedded, "load_embedded", lambda v: next(calls, None) or real(v))
    second = embedded.ensure_embedded(270, quiet=True)
    assert second == first
    leftovers = [p.name for p in (tiny_stdlib / "embedded").iterdir()]
    assert leftovers == [Path(first.prefix).parent.name]  # no temp folder left behind


def test_real_stdlib_listing() -> None:
    files = embedded.stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert not any("site-packages" in p.parts for p in files)


def test_cache_under_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neox.errors import DataError

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("NEOX_CACHE", str(tmp_path / "afile" / "cache"))
    monkeypatch.setattr(embedded, "stdlib_files", lambda: [])
    with pytest.raises(DataError, match="cannot build the embedded corpus in .*afile/cache/"
                       "embedded .*set NEOX_CACHE to a writable folder"):
        embedded.ensure_embedded(270)
