"""The preparation command: every input kind, tokenizer choice, and bad input."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neox.data.indexed import IndexedDataset
from neox.data.prepare import main, prepare
from neox.errors import DataError

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld ✓", "a", "class A:\n    pass\n" * 20]


def run(inputs, out: Path, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare([str(i) for i in inputs], str(out), **kw)


def byte_docs(prefix: Path) -> list[bytes]:
    """Documents of a bytes-tokenized output, with the trailing EOD checked and dropped."""
    ds = IndexedDataset(prefix)
    out = []
    for i in range(len(ds)):
        assert ds[i][-1] == 256
        out.append(bytes(ds[i][:-1].astype(np.uint8)))
    return out


def write_jsonl(path: Path, docs, field="text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def assert_no_output(out: Path) -> None:
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]
    assert leftovers == []


def test_jsonl_bytes(tmp_path: Path) -> None:
    r = run([write_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path / "out")
    assert byte_docs(tmp_path / "out") == [d.encode() for d in DOCS]
    assert (r.documents, r.vocab_size, r.eod_id, r.dtype) == (4, 257, 256, "uint16")
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["tokens"] == r.tokens == sum(len(d.encode()) + 1 for d in DOCS)
    assert (tmp_path / "out.tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_compressed_and_globs(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"content": d}) + "\n" for d in DOCS[:2]))
    write_jsonl(tmp_path / "c.jsonl", DOCS[2:], field="content")
    run([str(tmp_path / "*.jsonl*")], tmp_path / "out", text_field="content")
    assert byte_docs(tmp_path / "out") == [d.encode() for d in DOCS]


def test_zstd(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    raw = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    run([tmp_path / "d.jsonl.zst"], tmp_path / "out")
    assert byte_docs(tmp_path / "out") == [d.encode() for d in DOCS]


def test_text_folder_one_doc_per_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i, d in enumerate(DOCS):
        (src / "pkg" / f"m{i}.py").write_text(d)
    (src / "pkg" / "__init__.py").write_text("")  # empty files found by a walk are skipped
    r = run([src], tmp_path / "out")
    assert byte_docs(tmp_path / "out") == [d.encode() for d in DOCS]
    assert r.skipped_empty_files == 1


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "n": list(range(4))}), tmp_path / "p.parquet")
    run([tmp_path / "p.parquet"], tmp_path / "out")
    assert byte_docs(tmp_path / "out") == [d.encode() for d in DOCS]
    with pytest.raises(DataError, match="no column 'body'"):
        run([tmp_path / "p.parquet"], tmp_path / "out2", text_field="body")


def test_hf_local_paths_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    run([f"hf:{tmp_path / 'saved'}"], tmp_path / "out1")
    assert byte_docs(tmp_path / "out1") == [d.encode() for d in DOCS]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOCS)
    run([f"hf:{folder}"], tmp_path / "out2", streaming=True, split="train")
    assert byte_docs(tmp_path / "out2") == [d.encode() for d in DOCS]


def test_hf_tokenizer_and_trained_bpe(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    corpus = write_jsonl(tmp_path / "a.jsonl", DOCS * 10)
    r = run([corpus], tmp_path / "bpe", tokenizer="bpe:270")
    assert r.vocab_size == 270
    tok = Tokenizer.from_file(str(tmp_path / "bpe.tokenizer.json"))
    ds = IndexedDataset(tmp_path / "bpe")
    assert tok.decode(ds[1][:-1].tolist()) == DOCS[1] and ds[1][-1] == r.eod_id
    # The saved tokenizer.json, given back, reproduces the same tokens (and in 2 processes).
    run([corpus], tmp_path / "again", tokenizer=str(tmp_path / "bpe.tokenizer.json"), workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"again{ext}").read_bytes() == (tmp_path / f"bpe{ext}").read_bytes()


def test_prepared_output_feeds_build_datasets(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from neox.config.schema import DataConfig
    from neox.data import build_datasets

    run([write_jsonl(tmp_path / "a.jsonl", DOCS * 50)], tmp_path / "out")
    cfg = OmegaConf.structured(DataConfig(name="t", kind="prepared",
                                          prefixes=[str(tmp_path / "out")]))
    b = build_datasets(cfg, seq_len=8, num_samples={"train": 10}, seed=0, model_vocab_size=512,
                       is_builder=True, barrier=lambda: None)
    assert b.tokenizer_path.endswith("out.tokenizer.json") and len(b.train) == 10


def test_invalid_utf8_skip_or_fail(tmp_path: Path) -> None:
    good = json.dumps({"text": "ok"}).encode()
    (tmp_path / "a.jsonl").write_bytes(good + b"\n" + b'{"text": "bad \xff"}\n' + good + b"\n")
    (tmp_path / "b.txt").write_bytes(b"latin-1 caf\xe9")
    r = run([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "out")
    assert r.skipped_invalid_utf8 == 2 and byte_docs(tmp_path / "out") == [b"ok", b"ok"]
    with pytest.raises(DataError, match=r"a.jsonl:2 is not valid UTF-8"):
        run([tmp_path / "a.jsonl"], tmp_path / "out2", invalid_utf8="fail")
    assert_no_output(tmp_path / "out2")


def test_json_line_without_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    with path.open("a") as f:
        f.write(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl:5 has no string field 'text'"):
        run([path], tmp_path / "out")
    assert_no_output(tmp_path / "out")  # the interrupted run leaves nothing behind


def test_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"a.jsonl:2 is not valid JSON"):
        run([tmp_path / "a.jsonl"], tmp_path / "out")


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        run([tmp_path / "nope.jsonl"], tmp_path / "out")
    with pytest.raises(DataError, match="matches no files"):
        run([str(tmp_path / "*.jsonl")], tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        run([tmp_path / "empty.jsonl"], tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="hold no documents"):
        run([tmp_path / "blank.jsonl"], tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_tokenizer_larger_than_model_vocab(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="257 tokens but the model's padded vocab is 128"):
        run([write_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path / "out", model_vocab_size=128)
    assert_no_output(tmp_path / "out")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neox: error: input") and "does not exist" in err[0]
    corpus = write_jsonl(tmp_path / "a.jsonl", DOCS)
    done = subprocess.run([sys.executable, "-m", "neox.data.prepare", str(corpus), "-o",
                           str(tmp_path / "o"), "--workers", "2"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "docs" in done.stderr and "M tok/s" in done.stderr
    assert byte_docs(tmp_path / "o") == [d.encode() for d in DOCS]


def cli_error(capsys: pytest.CaptureFixture, *argv) -> str:
    """The one line `python -m neox.data.prepare ARGV -q` prints, checking it exits 2."""
    assert main([str(a) for a in argv] + ["-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neox: error: "), err
    return err[0]


@pytest.mark.parametrize("suffix", ["/", ""])
def test_output_naming_a_folder(tmp_path: Path, capsys, suffix: str) -> None:
    """Issue 13 #8: `-o folder/` wrote hidden files `.bin`, `.idx` in it."""
    corpus = write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "out").mkdir()
    err = cli_error(capsys, corpus, "-o", f"{tmp_path / 'out'}{suffix}")
    assert f"is a folder; give a prefix for the files, e.g. -o {tmp_path}/out/corpus" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_output_under_a_file_or_unwritable(tmp_path: Path, capsys) -> None:
    corpus = write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "afile").write_text("x")
    err = cli_error(capsys, corpus, "-o", tmp_path / "afile" / "sub" / "out")
    assert err.endswith(f"sub/out: {tmp_path}/afile is a file; choose a writable folder")
    err = cli_error(capsys, corpus, "-o", "/proc/neox-test/out")  # even root cannot write there
    assert err.startswith("neox: error: cannot write -o /proc/neox-test/out: /proc/neox-test:")


def _gzip_bytes(docs) -> bytes:
    return gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())


@pytest.mark.parametrize("name,content,match", [
    ("t.jsonl.gz", lambda: _gzip_bytes([f"{d} {i}" for i in range(300) for d in DOCS])[:2000],
     "t.jsonl.gz is truncated: its compressed data ends early after line \\d+; download or "
     "compress it again"),
    ("t.txt.gz", lambda: gzip.compress(b"x" * 5000)[:-12],
     "t.txt.gz is truncated: its compressed data ends early; download"),
    ("p.jsonl.gz", lambda: b'{"text": "plain"}\n',
     "p.jsonl.gz is named .gz but is not gzip-compressed \\(it starts with b'\\{\"'\\); "
     "rename it without .gz"),
    ("p.jsonl.zst", lambda: b'{"text": "plain"}\n',
     "p.jsonl.zst is named .zst but is not zstd-compressed"),
    ("t.jsonl.zst", lambda: __import__("zstandard").ZstdCompressor().compress(
        "".join(json.dumps({"text": d * 40}) + "\n" for d in DOCS * 200).encode())[:-40],
     "t.jsonl.zst is truncated: its compressed data ends early"),
])
def test_damaged_compressed_inputs(tmp_path: Path, capsys, name, content, match) -> None:
    """Tracebacks before (EOFError, BadGzipFile, ZstdError); a truncated .zst was even read
    silently, as far as it went."""
    import re

    (tmp_path / name).write_bytes(content())
    err = cli_error(capsys, tmp_path / name, "-o", tmp_path / "out")
    assert re.search(match, err), err
    assert_no_output(tmp_path / "out")


def test_zstd_of_several_frames(tmp_path: Path) -> None:
    """pzstd and `cat a.zst b.zst` write several frames; every frame is read."""
    import zstandard

    c = zstandard.ZstdCompressor()
    frames = [c.compress((json.dumps({"text": d}) + "\n").encode()) for d in DOCS]
    (tmp_path / "m.jsonl.zst").write_bytes(b"".join(frames))
    run([tmp_path / "m.jsonl.zst"], tmp_path / "out")
    assert byte_docs(tmp_path / "out") == [d.encode() for d in DOCS]


def test_damaged_parquet(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x" * 1000] * 3000}), tmp_path / "p.parquet",
                   row_group_size=1000)
    raw = bytearray((tmp_path / "p.parquet").read_bytes())
    raw[len(raw) // 3:len(raw) // 3 + 2000] = bytes(2000)  # the middle row group's pages
    (tmp_path / "p.parquet").write_bytes(bytes(raw))
    err = cli_error(capsys, tmp_path / "p.parquet", "-o", tmp_path / "out")
    assert "p.parquet cannot be read after row" in err and "the file is damaged" in err


def test_unreadable_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied is named (simulated: tests may run as root, who reads everything)."""
    import builtins

    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(DataError, match="a.jsonl cannot be read \\(permission denied\\); fix its "
                       "permissions"):
        run([path], tmp_path / "out")


def test_hf_dataset_without_network(tmp_path: Path) -> None:
    """No network: one line naming the dataset. A fresh process, since `datasets` reads the
    offline switch (which makes the failure immediate instead of ~20 s of retries) on import."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "neox.data.prepare", "hf:neox-test/no-such-data",
                           "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                          timeout=120, env=env)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("neox: error: dataset 'neox-test/no-such-data' (split 'train') "
                             "could not be found locally or downloaded (")
    assert err[0].endswith("give a local folder as hf:<path>")


def test_bpe_smaller_than_asked_warns(tmp_path: Path, capsys) -> None:
    """Issue 13 #12: `-t bpe:2000` on a small corpus gave a smaller vocab without a word."""
    corpus = write_jsonl(tmp_path / "a.jsonl", DOCS)
    assert main([str(corpus), "-o", str(tmp_path / "out"), "-t", "bpe:2000", "-q"]) == 0
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    vocab = meta["vocab_size"]
    assert vocab < 2000
    err = capsys.readouterr().err
    assert (f"warning: the trained BPE has {vocab} tokens, fewer than the 2000 asked" in err)
    assert meta["warnings"] and str(vocab) in meta["warnings"][0]
    run([corpus], tmp_path / "exact", tokenizer=f"bpe:{vocab}")
    assert "warning" not in capsys.readouterr().err


def test_second_run_into_its_input_folder(tmp_path: Path) -> None:
    """`prepare data/ -o data/corpus` twice read the first run's corpus.meta.json as JSON Lines."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", DOCS)
    first = run([folder], folder / "corpus")
    second = run([folder], folder / "corpus")
    assert (first.documents, first.tokens) == (second.documents, second.tokens) == (4, first.tokens)
    assert byte_docs(folder / "corpus") == [d.encode() for d in DOCS]


def test_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode()
                                       + b"\n" + json.dumps({"text": "second"}).encode() + b"\n")
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfplain")
    run([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "out")
    assert byte_docs(tmp_path / "out") == [b"first", b"second", b"plain"]


@pytest.mark.parametrize("content,match", [
    ('[\n  {"text": "a"},\n  {"text": "b"}\n]\n', "a.json:1 opens a multi-line JSON document"),
    ('[{"text": "a"}, {"text": "b"}]\n', "a.json:1 is a JSON array"),
])
def test_json_that_is_not_json_lines(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(DataError, match=f"{match}; inputs named .json or .jsonl must hold one "
                       "JSON object per line"):
        run([tmp_path / "a.json"], tmp_path / "out")


def test_full_disk_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error mid-run (simulated ENOSPC) is one line and leaves no partial output."""
    import errno

    from neox.data.indexed import IndexedDatasetWriter

    def full(self, flat, lengths):
        raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp_bin))

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", full)
    with pytest.raises(DataError, match="cannot write the output .*out.\\* \\(No space left on "
                       "device: .*out.bin.tmp-.*\\); choose a writable -o with free space"):
        run([write_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_hf_stream_breaking_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `datasets` stream that fails midway (network, damaged shard) is one line."""
    import datasets

    class Broken:
        column_names = ["text"]

        def __iter__(self):
            yield {"text": "one"}
            raise ConnectionError("Read timed out.\nsecond line")

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setattr(datasets, "load_from_disk", lambda path: Broken())
    with pytest.raises(DataError, match="dataset .*ds failed after example 1 \\(ConnectionError: "
                       "Read timed out.\\); run again, or save it locally first$"):
        run([f"hf:{tmp_path / 'ds'}"], tmp_path / "out")
    assert_no_output(tmp_path / "out")
