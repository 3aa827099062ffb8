"""Sample datasets: contents against a plain reference, splits, seeds, repeats and blending."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neox.data.indexed import IndexedDataset
from neox.data.sampling import (BlendedDataset, GPTDataset, IndexSpec, blend_indices,
                                build_index_arrays, check_weights, parse_split, split_ranges)
from neox.errors import DataError


def make_dataset(prefix: str, split: str = "train", doc_range=None, seq_len: int = 16,
                 num_samples: int = 100, seed: int = 1, allow_repeats: bool = True,
                 cache_dir=None) -> GPTDataset:
    data = IndexedDataset(prefix)
    spec = IndexSpec(prefix, split, doc_range or (0, len(data)), seq_len, num_samples, seed,
                     allow_repeats, cache_dir)
    spec.check(data)
    spec.build(data)
    return GPTDataset(data, spec)


def test_samples_match_reference_stream(small_corpus) -> None:
    prefix, docs = small_corpus
    ds = make_dataset(prefix, num_samples=3000, seq_len=16)  # ~20k tokens/epoch: 3 epochs
    # Reference: concatenate documents in doc_idx order and cut windows by hand.
    stream = np.concatenate([docs[d] for d in ds.doc_idx])
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds[i], stream[j * 16:j * 16 + 17])
    assert ds[0].dtype == np.int64 and ds[0].shape == (17,)


def test_each_epoch_is_a_permutation(small_corpus) -> None:
    prefix, docs = small_corpus
    ds = make_dataset(prefix, num_samples=3000)
    n = len(docs)
    assert len(ds.doc_idx) % n == 0 and len(ds.doc_idx) >= 2 * n
    for e in range(len(ds.doc_idx) // n):
        assert sorted(ds.doc_idx[e * n:(e + 1) * n]) == list(range(n))
    # Samples are shuffled within epoch-sized blocks: every sample appears once, and each complete
    # block of the layout is a permutation of its own positions.
    shuffle = np.asarray(ds.shuffle_idx)
    assert len(set(shuffle.tolist())) == 3000
    block = int(ds.num_tokens // ds.seq_len)
    for start in range(0, 3000 - block + 1, block):
        assert sorted(shuffle[start:start + block]) == list(range(start, start + block))


def test_order_is_prefix_stable(small_corpus, tmp_path: Path) -> None:
    """A run asking for more samples (more steps) sees the same samples first."""
    prefix, _ = small_corpus
    short = make_dataset(prefix, num_samples=700, cache_dir=str(tmp_path / "a"))
    long = make_dataset(prefix, num_samples=3000, cache_dir=str(tmp_path / "b"))
    assert all(np.array_equal(short[i], long[i]) for i in range(len(short)))


def test_seed_determines_order(small_corpus, tmp_path: Path) -> None:
    prefix, _ = small_corpus
    a = make_dataset(prefix, seed=1)
    b = make_dataset(prefix, seed=1, cache_dir=str(tmp_path / "other"))  # rebuilt, not cached
    c = make_dataset(prefix, seed=2)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert not all(np.array_equal(a[i], c[i]) for i in range(len(a)))


def test_index_cache_written_once(small_corpus, tmp_path: Path) -> None:
    prefix, _ = small_corpus
    ds = make_dataset(prefix, cache_dir=str(tmp_path / "cache"))
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.name.rsplit("_", 2)[1] for f in files] == ["doc", "sample", "shuffle"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    make_dataset(prefix, cache_dir=str(tmp_path / "cache"))
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not any(".tmp-" in f.name for f in files)
    assert len(ds) == 100


@pytest.mark.parametrize("bad", ["", "a,b,c", "1,2,3,4", "-1,1,1", "0,0,0", "nan,1,1"])
def test_malformed_split(bad: str) -> None:
    with pytest.raises(DataError, match="malformed split"):
        parse_split(bad)


def test_split_ranges_do_not_overlap(small_corpus) -> None:
    assert parse_split("98,2") == [98, 2, 0]
    r = split_ranges(1000, "969,30,1")
    assert r == {"train": (0, 969), "valid": (969, 999), "test": (999, 1000)}
    prefix, _ = small_corpus
    train = make_dataset(prefix, "train", (0, 150), num_samples=50)
    valid = make_dataset(prefix, "valid", (150, 200), num_samples=50)
    assert set(train.doc_idx).isdisjoint(set(valid.doc_idx))
    assert set(train.doc_idx) == set(range(150)) and set(valid.doc_idx) == set(range(150, 200))


def test_no_repeats_raises_when_data_runs_out(small_corpus) -> None:
    prefix, docs = small_corpus
    tokens = sum(len(d) for d in docs)
    have = (tokens - 1) // 16
    make_dataset(prefix, num_samples=have, allow_repeats=False)  # exactly one epoch: fine
    with pytest.raises(DataError, match="without repeats"):
        make_dataset(prefix, num_samples=have + 1, allow_repeats=False)


def test_empty_split_raises() -> None:
    with pytest.raises(DataError, match="no tokens"):
        build_index_arrays(np.array([0, 0], np.int32), np.arange(2), 4, 1, 0)


def test_blend_indices_proportions() -> None:
    weights = [0.5, 0.3, 0.2]
    which, nth = blend_indices(weights, 100_000)
    counts = np.bincount(which) / 100_000
    assert np.abs(counts - weights).max() < 0.01
    # Every prefix is within one sample of its share, and each source is read in order.
    running = np.cumsum(np.eye(3)[which], axis=0)
    expected = np.arange(1, 100_001)[:, None] * np.array(weights)
    assert np.abs(running - expected).max() <= 1.0
    for d in range(3):
        assert list(nth[which == d][:5]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("weights", [[1.0, -1.0], [1.0, 0.0], [1.0, float("nan")],
                                     [1.0, float("inf")], [1.0]])
def test_bad_blend_weights(weights) -> None:
    with pytest.raises(DataError):
        check_weights(weights, 2)


def test_blended_dataset_realised_proportions(tmp_path: Path, random_docs, write_docs) -> None:
    # Each source's tokens lie in its own id range, so a sample tells which source it is from.
    prefixes = [write_docs(tmp_path / f"s{k}", [d + 1000 * k for d in random_docs(50, seed=k)])
                for k in range(3)]
    weights = [0.6, 0.3, 0.1]
    n = 100_000
    which, nth = blend_indices(weights, n)
    counts = np.bincount(which, minlength=3)
    parts = [make_dataset(p, num_samples=int(c), seq_len=4) for p, c in zip(prefixes, counts)]
    blend = BlendedDataset(parts, which, nth, weights)
    source = np.array([blend[i][0] // 1000 for i in range(0, n)])
    realised = np.bincount(source, minlength=3) / n
    assert np.abs(realised - weights).max() < 0.01


def test_reprepared_prefix_with_same_totals_is_not_served_stale_offsets(
        tmp_path: Path, write_docs) -> None:
    """Issue 13 #4: the cache key hashed the document and token counts, so a prefix prepared again
    with the same totals but other sizes reused the old arrays (an IndexError, or wrong samples)."""
    prefix = str(tmp_path / "c")
    write_docs(prefix, [np.arange(10) for _ in range(10)])
    make_dataset(prefix, seq_len=8, num_samples=30)  # caches arrays for the first version
    sizes = [1, 2, 3, 4, 80, 0, 0, 5, 5, 0]  # 10 documents, 100 tokens again
    for ext in (".bin", ".idx"):
        Path(prefix + ext).unlink()
    write_docs(prefix, [np.arange(s) + 1000 * k for k, s in enumerate(sizes)])
    again = make_dataset(prefix, seq_len=8, num_samples=30)
    fresh = make_dataset(prefix, seq_len=8, num_samples=30, cache_dir=str(tmp_path / "fresh"))
    assert all(np.array_equal(again[i], fresh[i]) for i in range(30))


def test_allow_repeats_is_part_of_the_cache_key(tmp_path: Path, write_docs) -> None:
    """allow_repeats changes how many samples are laid out, so it changes the arrays."""
    prefix = write_docs(tmp_path / "c", [np.arange(16) for _ in range(10)])  # 160 tokens
    differs = 0
    for seed in range(20):
        make_dataset(prefix, seq_len=16, num_samples=5, seed=seed, allow_repeats=True)
        cached = make_dataset(prefix, seq_len=16, num_samples=5, seed=seed, allow_repeats=False)
        fresh = make_dataset(prefix, seq_len=16, num_samples=5, seed=seed, allow_repeats=False,
                             cache_dir=str(tmp_path / f"fresh{seed}"))
        assert np.array_equal(cached.shuffle_idx, fresh.shuffle_idx)
        with_repeats = make_dataset(prefix, seq_len=16, num_samples=5, seed=seed,
                                    cache_dir=str(tmp_path / f"rep{seed}"))
        differs += not np.array_equal(with_repeats.shuffle_idx, fresh.shuffle_idx)
    assert differs  # the two settings do lay out different samples for some seeds


def test_unreadable_index_cache_file(small_corpus, tmp_path: Path) -> None:
    prefix, _ = small_corpus
    make_dataset(prefix, cache_dir=str(tmp_path / "cache"))
    victim = next((tmp_path / "cache").glob("*_sample_idx.npy"))
    victim.write_bytes(b"not an npy file")
    with pytest.raises(DataError, match=f"index cache file .*{victim.name} is not a readable "
                       ".npy file \\(damaged\\?\\); delete it and run again"):
        make_dataset(prefix, cache_dir=str(tmp_path / "cache"))


def test_index_cache_under_a_file(small_corpus, tmp_path: Path) -> None:
    prefix, _ = small_corpus
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="cannot create the cache folder .*afile/c: "
                       ".*afile is a file; set data.cache_dir to a folder"):
        make_dataset(prefix, cache_dir=str(tmp_path / "afile" / "c"))
