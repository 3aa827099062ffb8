"""The .bin/.idx format: round trips, a header built by hand from the spec, and bad files."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from neox.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from neox.errors import DataError


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_round_trip_random_docs(tmp_path: Path, dtype, random_docs, write_docs) -> None:
    docs = random_docs(300, seed=1, vocab=200)
    docs.insert(5, np.zeros(0, dtype=np.int64))  # an empty document survives too
    ds = IndexedDataset(write_docs(tmp_path / "rt", docs, dtype))
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert list(ds.sizes) == [len(d) for d in docs]
    assert list(ds.doc_idx) == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(7, offset=3, length=4), docs[7][3:7])
    np.testing.assert_array_equal(ds.get(7, offset=2), docs[7][2:])
    assert ds.num_tokens == sum(len(d) for d in docs)


def _hand_written(prefix: Path, docs: list[list[int]], code: int, np_dtype,
                  doc_idx: list[int] | None = None) -> None:
    """An index written straight from the format spec, sharing no code with neox."""
    sizes = [len(d) for d in docs]
    itemsize = np.dtype(np_dtype).itemsize
    pointers, at = [], 0
    for s in sizes:
        pointers.append(at)
        at += s * itemsize
    doc_idx = doc_idx or list(range(len(docs) + 1))
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    header += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    body = struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    body += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    Path(f"{prefix}.idx").write_bytes(header + body)
    fmt = {8: "H", 4: "i"}[code]
    Path(f"{prefix}.bin").write_bytes(b"".join(struct.pack(f"<{len(d)}{fmt}", *d) for d in docs))


@pytest.mark.parametrize("code,np_dtype", [(8, np.uint16), (4, np.int32)])
def test_reads_hand_written_header(tmp_path: Path, code: int, np_dtype, write_docs) -> None:
    docs = [[1, 2, 3], [65000 if code == 8 else 70000], [], [4, 5]]
    _hand_written(tmp_path / "hand", docs, code, np_dtype)
    ds = IndexedDataset(tmp_path / "hand")
    assert ds.dtype == np.dtype(np_dtype)
    assert [list(ds[i]) for i in range(len(ds))] == docs
    # ...and our writer produces the very same bytes.
    write_docs(tmp_path / "ours", [np.array(d) for d in docs], np_dtype)
    for ext in (".idx", ".bin"):
        assert Path(f"{tmp_path}/ours{ext}").read_bytes() == \
            Path(f"{tmp_path}/hand{ext}").read_bytes()


def test_reads_gpt_neox_sentence_split_layout(tmp_path: Path) -> None:
    """GPT-NeoX with --split-sentences stores several sequences per document."""
    seqs = [[1, 2], [3], [4, 5, 6], [7]]
    _hand_written(tmp_path / "s", seqs, 8, np.uint16, doc_idx=[0, 2, 4])
    ds = IndexedDataset(tmp_path / "s")
    assert len(ds) == 4 and list(ds.doc_idx) == [0, 2, 4]
    assert [list(ds[i]) for i in range(4)] == seqs


def test_best_dtype() -> None:
    assert best_dtype(50257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document(np.arange(10))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_token_too_large_for_dtype(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not fit"):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document(np.array([70000]))
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset(tmp_path: Path, write_docs) -> None:
    ds = IndexedDataset(write_docs(tmp_path / "e", []))
    assert len(ds) == 0 and ds.num_tokens == 0


@pytest.fixture
def prefix(tmp_path: Path, random_docs, write_docs) -> str:
    return write_docs(tmp_path / "c", random_docs(20, seed=2))


def test_wrong_magic(prefix: str) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[:9] = b"TNTIDX\x00\x00\x00"
    Path(prefix + ".idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic"):
        IndexedDataset(prefix)


def test_wrong_version(prefix: str) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    Path(prefix + ".idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version 2"):
        IndexedDataset(prefix)


def test_unknown_dtype_code(prefix: str) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[17] = 9
    Path(prefix + ".idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="dtype code 9"):
        IndexedDataset(prefix)


def test_truncated_bin(prefix: str) -> None:
    raw = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(raw[:-2])
    with pytest.raises(DataError, match="truncated"):
        IndexedDataset(prefix)


def test_pointer_past_bin_end(prefix: str) -> None:
    ds = IndexedDataset(prefix)
    n = len(ds)
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    at = 34 + 4 * n + 8 * (n - 1)  # the last pointer
    raw[at:at + 8] = struct.pack("<q", 10**9)
    del ds
    Path(prefix + ".idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"sequence {n - 1} starts at byte 1000000000 but the "
                       "sizes before it put it at .*the pointers are corrupt"):
        IndexedDataset(prefix)


def test_truncated_idx(prefix: str) -> None:
    raw = Path(prefix + ".idx").read_bytes()
    Path(prefix + ".idx").write_bytes(raw[:-8])
    with pytest.raises(DataError, match="truncated"):
        IndexedDataset(prefix)
    Path(prefix + ".idx").write_bytes(raw[:20])
    with pytest.raises(DataError, match="shorter than the MMIDIDX header"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("remove", [".bin", ".idx"])
def test_prefix_without_pair(prefix: str, remove: str) -> None:
    Path(prefix + remove).unlink()
    with pytest.raises(DataError, match=f"\\{remove} is missing while its pair exists"):
        IndexedDataset(prefix)


def test_missing_prefix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no prepared data"):
        IndexedDataset(tmp_path / "nothing")


def _set_dtype_code(prefix: str, code: int) -> None:
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[17] = code
    Path(prefix + ".idx").write_bytes(bytes(raw))


@pytest.mark.parametrize("written,claimed,code", [(np.int32, "uint16", 8), (np.uint16, "int32", 4)])
def test_dtype_code_disagreeing_with_pointers(tmp_path: Path, random_docs, write_docs, written,
                                              claimed, code) -> None:
    """Issue 13 #5: int32 tokens under a uint16 code were read as garbage and trained."""
    prefix = write_docs(tmp_path / "c", random_docs(20, seed=3), written)
    _set_dtype_code(prefix, code)
    step = np.dtype(written).itemsize
    with pytest.raises(DataError, match=f"c.idx says dtype code {code} \\({claimed}, "
                       f"{np.dtype(claimed).itemsize} bytes/token\\) but its pointers advance "
                       f"{step} bytes/token: the dtype code disagrees with the pointers"):
        IndexedDataset(prefix)


def test_dtype_code_disagreeing_with_a_single_sequence(tmp_path: Path, write_docs) -> None:
    """One sequence has no second pointer to tell; the .bin's length per token does."""
    prefix = write_docs(tmp_path / "c", [np.arange(100)], np.int32)
    _set_dtype_code(prefix, 8)
    with pytest.raises(DataError, match="says dtype code 8 \\(uint16\\) but .*c.bin holds 4 "
                       "bytes per token: the dtype code disagrees"):
        IndexedDataset(prefix)


def test_bin_longer_than_its_index(prefix: str) -> None:
    """Upstream writers make the .bin exactly as long as the .idx describes; extra bytes mean the
    pair comes from two preparations."""
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\x00" * 6)
    with pytest.raises(DataError, match="belongs to another index"):
        IndexedDataset(prefix)


def test_prefix_given_with_extension(prefix: str) -> None:
    with pytest.raises(DataError, match="drop the extension"):
        IndexedDataset(prefix + ".bin")


def test_identity_follows_the_index_content(tmp_path: Path, write_docs) -> None:
    """Same document and token counts, other sizes: another identity (issue 13 #4)."""
    a = IndexedDataset(write_docs(tmp_path / "a", [np.arange(3), np.arange(7)]))
    b = IndexedDataset(write_docs(tmp_path / "b", [np.arange(5), np.arange(5)]))
    c = IndexedDataset(write_docs(tmp_path / "c", [np.arange(3) + 1, np.arange(7) + 1]))
    assert (len(a), a.num_tokens) == (len(b), b.num_tokens)
    assert a.identity != b.identity
    assert a.identity == c.identity  # the index arrays depend on the sizes only


def test_unreadable_index(prefix: str) -> None:
    """An OSError on open (here: the .idx is a folder) is one line naming the file."""
    Path(prefix + ".idx").unlink()
    Path(prefix + ".idx").mkdir()
    with pytest.raises(DataError, match=f"cannot read {prefix}.idx \\(Is a directory\\)"):
        IndexedDataset(prefix)
