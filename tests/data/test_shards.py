"""Sharded preparation: pieces in parallel processes, merged byte-identical to one process.

The reference is always the single-process `prepare` over the same inputs (and, for the plan,
sources.iter_documents): the sharded run must reproduce its .bin/.idx byte for byte.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neox.data import shards
from neox.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox.data.prepare import main, prepare
from neox.data.sources import iter_documents, resolve_inputs
from neox.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def make_corpus(folder: Path, lines: int = 400, seed: int = 0) -> list[str]:
    """JSON lines of varied lengths (blank lines too), a .gz, text files and an empty file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["def", "return", "héllo", "日本", " ", "\n", "x = 1", "<|endoftext|>", "  ", "🙂"]

    def doc() -> str:
        return "".join(rng.choice(words) for _ in range(rng.randint(0, 300)))

    with open(folder / "a.jsonl", "w") as f:
        for i in range(lines):
            f.write(json.dumps({"text": doc(), "id": i}) + "\n")
            if i % 37 == 0:
                f.write("\n")  # blank lines are skipped, not documents
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": doc()}) + "\n" for _ in range(50))
    (folder / "c.txt").write_text(doc() * 20)
    (folder / "d.txt").write_text("")
    with open(folder / "e.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc()}) + "\n" for _ in range(lines // 2))
    return [str(folder)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    from neox.data.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("tok")
    texts = [d for d in iter_documents(resolve_inputs(make_corpus(folder / "c")))]
    train_bpe(texts, 400).save(folder / "tok.json")
    return str(folder / "tok.json")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
def test_pieces_read_every_document_once(tmp_path: Path, n: int) -> None:
    inputs = make_corpus(tmp_path / "c")
    sources = resolve_inputs(inputs)
    expected_stats = shards.Counts()
    expected = list(iter_documents(sources, stats=expected_stats))
    pieces = shards.plan(sources, n)
    assert len(pieces) == n
    got, totals = [], shards.Counts()
    for items in pieces:
        docs = shards.ItemDocs(items)
        got += [text for text, _ in docs]
        totals.add(docs.counts())
    assert got == expected
    assert totals.documents == expected_stats.documents == len(expected)
    assert totals.skipped_empty_files == expected_stats.skipped_empty_files == 1
    assert totals.bytes_read == sum(os.path.getsize(s.path) for s in sources)
    if n > 1:  # the big JSON-lines file is cut between lines
        assert sum(i.path.endswith("a.jsonl") for p in pieces for i in p) > 1


def test_every_cut_offset(tmp_path: Path) -> None:
    """Two ranges cut at every byte of a file (mid-line, on a line start, next to blank and
    CRLF lines): each line is read exactly once."""
    path = tmp_path / "x.jsonl"
    lines = [json.dumps({"text": f"doc {i} " + "é" * (i % 3)}) for i in range(12)]
    path.write_bytes(("\n".join(lines[:5]) + "\n\n" + "\r\n".join(lines[5:]) + "\n").encode())
    size = path.stat().st_size
    expected = [t for t, _ in shards.ItemDocs([shards.Item(str(path), size)])]
    assert len(expected) == 12
    for cut in range(1, size + 1):
        first = shards.Item(str(path), size, start=0, end=cut)
        second = shards.Item(str(path), size, start=cut, end=None)
        got = [t for t, _ in shards.ItemDocs([first])] + [t for t, _ in shards.ItemDocs([second])]
        assert got == expected, cut


def _same_output(a: Path, b: Path) -> None:
    for ext in (".bin", ".idx"):
        assert Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes(), ext


def test_sharded_equals_single_process(tmp_path: Path, bpe: str) -> None:
    inputs = make_corpus(tmp_path / "c")
    single = prepare(inputs, str(tmp_path / "single"), bpe, progress=False)
    r = prepare(inputs, str(tmp_path / "sharded"), bpe, shards=4, workers=2, progress=False)
    _same_output(tmp_path / "single", tmp_path / "sharded")
    assert (r.documents, r.tokens, r.skipped_empty_files) == (
        single.documents, single.tokens, single.skipped_empty_files)
    meta = json.loads((tmp_path / "sharded.meta.json").read_text())
    assert meta["shards"] == 4 and meta["encoder"] == "tiktoken"
    assert (tmp_path / "sharded.tokenizer.json").read_bytes() == \
        (tmp_path / "single.tokenizer.json").read_bytes()
    assert not (tmp_path / "sharded.shards").exists()  # pieces removed after the merge
    # An output inside the input folder: the pieces of a run are never read back as input.
    prepare(inputs, str(tmp_path / "c" / "out"), bpe, shards=3, workers=2, progress=False)
    _same_output(tmp_path / "single", tmp_path / "c" / "out")
    # Nor the pieces an interrupted sharded run left there, when run again without --shards.
    inputs = make_corpus(tmp_path / "c2")
    (tmp_path / "c2" / "again.shards").mkdir()
    (tmp_path / "c2" / "again.shards" / "piece-00000-of-00002.bin").write_bytes(b"\x01" * 64)
    prepare(inputs, str(tmp_path / "c2" / "again"), bpe, progress=False)
    _same_output(tmp_path / "single", tmp_path / "c2" / "again")


def _cli(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "neox.data.prepare", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_piece_resumes(tmp_path: Path, bpe: str) -> None:
    """SIGKILL one piece's process mid-run: the run names it, keeps the others, and the same
    command again prepares only that piece."""
    inputs = make_corpus(tmp_path / "c", lines=1500)
    out = tmp_path / "out"
    # One piece at a time with the slower encoder, so piece 1 is caught running.
    proc = _cli(*inputs, "-o", str(out), "-t", bpe, "--shards", "4", "--workers", "1",
                "--encoder", "tokenizers", "-q")
    status = out.with_name("out.shards") / "piece-00001-of-00004.status.json"
    deadline = time.time() + 120
    while not status.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    os.kill(json.loads(status.read_text())["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "neox: error: 1 of 4 pieces failed (piece 1 was killed (signal 9)); the 3 prepared " \
           "pieces are kept in" in err
    work = tmp_path / "out.shards"
    assert sorted(p.name for p in work.glob("*.done.json")) == [
        f"piece-0000{k}-of-00004.done.json" for k in (0, 2, 3)]
    for k in (0, 2, 3):
        IndexedDataset(work / f"piece-0000{k}-of-00004")  # intact
    again = _cli(*inputs, "-o", str(out), "-t", bpe, "--shards", "4", "--workers", "2")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming: 3 of 4 pieces are already prepared" in err
    prepare(inputs, str(tmp_path / "single"), bpe, progress=False)
    _same_output(tmp_path / "single", out)
    assert not work.exists()


def _bad_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    path.write_text("".join(lines))


@pytest.mark.parametrize("fault, message", [
    ("json", r"a\.jsonl:{line} is not valid JSON \(Expecting value\); fix or remove the line$"),
    ("surrogate", r"a\.jsonl:{line}: the tokenizer cannot encode this document "
                  r"\(.*\); fix or remove it$"),
    ("truncated", r"b\.jsonl\.gz is truncated: its compressed data ends early after line \d+; "
                  "download or compress it again"),
], ids=["json", "surrogate", "truncated"])
def test_failing_piece_names_file_and_line(tmp_path: Path, bpe: str, fault: str,
                                           message: str) -> None:
    """The bad input is in one piece only: the error names it, the other pieces stay, and
    after the fix the same command prepares the rest; the result equals one process's."""
    inputs = make_corpus(tmp_path / "c")
    a, b = tmp_path / "c" / "a.jsonl", tmp_path / "c" / "b.jsonl.gz"
    good_a, good_b = a.read_bytes(), b.read_bytes()
    line = 301  # in the second half of a.jsonl: a piece that starts mid-file reads it
    if fault == "json":
        _bad_line(a, line, '{"text": }\n')
    elif fault == "surrogate":
        _bad_line(a, line, '{"text": "lone \\udc00 surrogate"}\n')
    else:
        b.write_bytes(good_b[:len(good_b) // 2])
    pieces = shards.plan(resolve_inputs(inputs), 4)
    assert [i.start for i in pieces[1] if i.path == str(a)][0] > 0
    with pytest.raises(DataError, match=r"^1 of 4 pieces failed \(piece \d: .*" +
                       message.format(line=line).rstrip("$")) as err:
        prepare(inputs, str(tmp_path / "out"), bpe, shards=4, workers=2, progress=False)
    assert "the 3 prepared pieces are kept in" in str(err.value)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    assert len(list((tmp_path / "out.shards").glob("*.done.json"))) == 3
    a.write_bytes(good_a)
    b.write_bytes(good_b)
    prepare(inputs, str(tmp_path / "out"), bpe, shards=4, workers=2, progress=False)
    prepare(inputs, str(tmp_path / "single"), bpe, progress=False)
    _same_output(tmp_path / "single", tmp_path / "out")


def test_merge_refuses_other_tokenizers_and_dtypes(tmp_path: Path, bpe: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    make_corpus(tmp_path / "c")
    a = tmp_path / "c" / "a.jsonl"
    e = tmp_path / "c" / "e.jsonl"
    prepare([str(a)], str(tmp_path / "p1"), bpe, progress=False)
    prepare([str(e)], str(tmp_path / "p2"), bpe, progress=False)
    prepare([str(e)], str(tmp_path / "bytes"), "bytes", progress=False)
    # The same tokenizer but int32 tokens (as another tool might have written them).
    ds = IndexedDataset(tmp_path / "p2")
    with IndexedDatasetWriter(tmp_path / "wide", np.int32) as w:
        for i in range(len(ds)):
            w.add_document(ds[i])
    (tmp_path / "wide.tokenizer.json").write_bytes((tmp_path / "p2.tokenizer.json").read_bytes())

    assert shards.main(["-o", str(tmp_path / "m1"), str(tmp_path / "p1"),
                        str(tmp_path / "bytes")]) == 2
    ids = [shards.tokenizer_id(tmp_path / f"{p}.tokenizer.json") for p in ("bytes", "p1")]
    assert f"bytes was prepared with tokenizer {ids[0]} but {tmp_path / 'p1'} with {ids[1]};" \
        in capsys.readouterr().err
    assert shards.main(["-o", str(tmp_path / "m2"), str(tmp_path / "p1"),
                        str(tmp_path / "wide")]) == 2
    assert "wide holds int32 tokens but" in capsys.readouterr().err
    assert not list(tmp_path.glob("m[12]*"))  # nothing written
    # Pieces of one tokenizer and dtype merge into what one run over both inputs writes.
    assert shards.main(["-o", str(tmp_path / "m"), str(tmp_path / "p1"), str(tmp_path / "p2")]) == 0
    prepare([str(a), str(e)], str(tmp_path / "both"), bpe, progress=False)
    _same_output(tmp_path / "both", tmp_path / "m")


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = make_corpus(tmp_path / "c")
    with pytest.raises(DataError, match=r"--shards reads local files, and hf:x is a datasets"):
        prepare(["hf:x", *corpus], str(tmp_path / "o"), shards=2, progress=False)
    assert main([*corpus, "-o", str(tmp_path / "o"), "--partition", "gpu"]) == 2
    assert "neox: error: --partition only applies with --slurm; add --slurm or drop them" in \
        capsys.readouterr().err
    with pytest.raises(DataError, match="--shards 0: give 1 or more"):
        prepare(corpus, str(tmp_path / "o"), shards=0, progress=False)


def test_a_folder_of_the_pieces_name_not_made_by_prepare_is_never_emptied(tmp_path: Path) -> None:
    """The pieces' folder `<-o>.shards` is removed after the merge: a user's own folder of that name
    is refused before anything runs, and left as it was; a file of that name too."""
    corpus = make_corpus(tmp_path / "c")
    mine = tmp_path / "o.shards"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"o.shards exists and was not made by .*--shards"):
        prepare(corpus, str(tmp_path / "o"), shards=2, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "o.bin").exists()
    (tmp_path / "p.shards").write_text("a file")
    with pytest.raises(DataError, match=r"p.shards is a file"):
        prepare(corpus, str(tmp_path / "p"), shards=2, progress=False)


def test_progress_and_summary(tmp_path: Path, bpe: str, capsys: pytest.CaptureFixture) -> None:
    """Bytes with an ETA while running; then bytes and tokens per second, and what was skipped
    and why, for one process and for pieces."""
    inputs = make_corpus(tmp_path / "c")
    with open(tmp_path / "c" / "a.jsonl", "ab") as f:
        f.write(b'{"text": "bad \xff byte"}\n')
    size = sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    r = prepare(inputs, str(tmp_path / "one"), bpe)
    err = capsys.readouterr().err
    from tqdm import tqdm

    total = tqdm.format_sizeof(size, divisor=1000)
    assert f"100%|██████████| {total}/{total} [" in err and "B/s" in err  # bytes, rate, ETA
    assert re.search(rf"wrote {tmp_path / 'one'}\.bin/\.idx: read {size / 1e6:.1f} MB "
                     rf"\([\d.]+ MB/s\), {r.documents} docs, {r.tokens / 1e6:.2f} M tokens in "
                     r"[\d.]+ s \([\d.]+ M tok/s, encoder tiktoken\); skipped: 1 document of "
                     r"invalid UTF-8, 1 empty file$", err, re.M), err
    prepare(inputs, str(tmp_path / "two"), bpe, shards=2, workers=2)
    err = capsys.readouterr().err
    assert re.search(rf"wrote {tmp_path / 'two'}\.bin/\.idx from 2 pieces: {r.documents} docs, "
                     rf"{r.tokens / 1e6:.2f} M tokens, {size / 1e6:.1f} MB read in [\d.]+ s "
                     r"\([\d.]+ M tok/s, [\d.]+ MB/s, encoder tiktoken\); skipped: 1 document "
                     r"of invalid UTF-8, 1 empty file$", err, re.M), err


def test_piece_that_cannot_write_says_so(tmp_path: Path, bpe: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while a piece writes: its status says which files and why, in one line."""
    import errno

    inputs = make_corpus(tmp_path / "c")
    items = shards.plan(resolve_inputs(inputs), 1)[0]
    (tmp_path / "w").mkdir()
    job = shards.PieceJob(0, 1, tuple(items), str(tmp_path / "w"), bpe, shards.tokenizer_id(bpe),
                          None, "uint16", "text", "skip", "auto", threads=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", full)
    msg = (f"cannot write {job.prefix}.* (No space left on device); free some space or choose "
           "another -o")
    assert shards.run_piece(job) == {"error": msg}
    assert json.loads(job.status_file.read_text()) == {"error": msg}
    assert job.finished() is None
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [job.status_file.name]
