"""build_datasets: the trainer's entry point, for prepared files, blends and the embedded corpus."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from neox.config.schema import DataConfig
from neox.data import build_datasets, make_loader
from neox.data.tokenizer import BytesTokenizer
from neox.errors import DataError

SAMPLES = {"train": 200, "valid": 20, "test": 10}


def cfg(**kw) -> DataConfig:
    return OmegaConf.structured(DataConfig(name="test", **kw))


def build(data_cfg, *, is_builder=True, barrier=lambda: None, model_vocab=512, **kw):
    args = dict(seq_len=16, num_samples=SAMPLES, seed=7, model_vocab_size=model_vocab)
    args.update(kw)
    return build_datasets(data_cfg, is_builder=is_builder, barrier=barrier, **args)


@pytest.fixture
def byte_corpora(tmp_path: Path, random_docs, write_docs) -> list[str]:
    """Two corpora of byte tokens (vocab 257), with the bytes tokenizer saved beside the first."""
    prefixes = [write_docs(tmp_path / f"c{k}", random_docs(300, seed=k, vocab=256))
                for k in range(2)]
    BytesTokenizer().save(prefixes[0] + ".tokenizer.json")
    return prefixes


def test_prepared_single_source(byte_corpora) -> None:
    b = build(cfg(kind="prepared", prefixes=byte_corpora[:1]))
    assert (b.vocab_size, b.eod_id) == (257, 256)
    assert b.tokenizer_path.endswith("c0.tokenizer.json")
    assert [len(ds) for ds in (b.train, b.valid)] == [200, 20]
    assert b.test is None  # 300 docs at 969,30,1 leave the test split no document
    assert b.train[0].shape == (17,) and b.train[0].dtype == np.int64
    batch = next(make_loader(b.train, micro_batch=4, dp_rank=0, dp_size=1))
    assert tuple(batch.shape) == (4, 17)
    assert "c0: 300 documents (291/9/0" in b.describe()


def test_empty_split_is_none(byte_corpora) -> None:
    b = build(cfg(kind="prepared", prefixes=byte_corpora[:1], split="1,0,0"))
    assert b.train is not None and b.valid is None and b.test is None


def test_blend_of_two(byte_corpora) -> None:
    b = build(cfg(kind="prepared", prefixes=byte_corpora, weights=[3, 1], tokenizer="bytes"),
              num_samples={"train": 400, "valid": 40, "test": 0})
    assert len(b.train) == 400 and b.test is None
    assert np.bincount(b.train.dataset_index).tolist() == [300, 100]
    assert "weight 0.750" in b.describe()


def test_vocab_larger_than_model(byte_corpora) -> None:
    with pytest.raises(DataError, match="257 tokens but the model's vocab is 200"):
        build(cfg(kind="prepared", prefixes=byte_corpora[:1]), model_vocab=200)


def test_missing_tokenizer(byte_corpora) -> None:
    with pytest.raises(DataError, match="set data.tokenizer"):
        build(cfg(kind="prepared", prefixes=byte_corpora[1:]))


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [1, float("nan")], [1]])
def test_bad_weights(byte_corpora, weights) -> None:
    with pytest.raises(DataError):
        build(cfg(kind="prepared", prefixes=byte_corpora, weights=weights, tokenizer="bytes"))


def test_no_repeats_error(byte_corpora) -> None:
    with pytest.raises(DataError, match="allow_repeats"):
        build(cfg(kind="prepared", prefixes=byte_corpora[:1], allow_repeats=False),
              num_samples={"train": 100_000})


def test_builder_and_waiter_ranks(byte_corpora, tmp_path: Path) -> None:
    """Rank 0 builds the index cache while rank 1 waits at the barrier; both see the same data."""
    barrier = threading.Barrier(2, timeout=60)
    data_cfg = cfg(kind="prepared", prefixes=byte_corpora, weights=[1, 1], tokenizer="bytes",
                   cache_dir=str(tmp_path / "cache"))
    results: dict[int, object] = {}

    def rank(r: int) -> None:
        results[r] = build(data_cfg, is_builder=r == 0, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results[0].train, results[1].train
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))


def test_waiter_without_shared_cache(byte_corpora, tmp_path: Path) -> None:
    data_cfg = cfg(kind="prepared", prefixes=byte_corpora[:1], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="shared"):
        build(data_cfg, is_builder=False)


def test_embedded(embedded_cache: Path) -> None:
    t0 = time.perf_counter()
    b = build(cfg(kind="embedded"), model_vocab=8192)
    assert time.perf_counter() - t0 < 1.0  # cached: the fixture built it
    assert b.vocab_size == 8192 and b.eod_id == 0
    assert str(embedded_cache) in b.tokenizer_path
    sample = b.train[0]
    assert sample.max() < 8192
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(b.tokenizer_path).decode(sample.tolist())
    assert len(text) > 16  # real source text, not noise


def test_unigram_entropy_matches_a_hand_count(tmp_path) -> None:
    import math

    from neox.data.build import unigram_entropy
    from neox.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(str(tmp_path / "a"), np.uint16) as w:
        w.add_document(np.array([0, 0, 1, 1]))
    with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as w:
        w.add_document(np.array([2, 2, 2, 2, 2, 2, 2, 2]))
    assert math.isclose(unigram_entropy([str(tmp_path / "a")]), math.log(2), rel_tol=1e-12)
    # a and b together: p = (1/6, 1/6, 2/3)
    expected = -(2 * (1 / 6) * math.log(1 / 6) + (2 / 3) * math.log(2 / 3))
    assert math.isclose(unigram_entropy([str(tmp_path / "a"), str(tmp_path / "b")]), expected, rel_tol=1e-12)


@pytest.fixture
def bpe_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE trained here: 300 tokens whose ids differ from the bytes tokenizer's."""
    from neox.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    text = " ".join(f"w{i * 7919 % 10007}" for i in range(5000))  # plenty of distinct merges
    tok = train_bpe([text], 300)
    assert tok.vocab_size == 300
    tok.save(path)
    return str(path)


def test_blend_of_two_tokenizers_is_refused(byte_corpora, bpe_tokenizer) -> None:
    """Issue 13 #3: only the first prefix's tokenizer was read; byte ids were fed as BPE ids."""
    import shutil

    shutil.copy(bpe_tokenizer, byte_corpora[1] + ".tokenizer.json")
    with pytest.raises(DataError, match=f"data.prefixes mix tokenizers: {byte_corpora[0]} was "
                       f"prepared with .*c0.tokenizer.json \\(vocab 257\\) and {byte_corpora[1]} "
                       "with another \\(.*c1.tokenizer.json, vocab 300\\)"):
        build(cfg(kind="prepared", prefixes=byte_corpora, weights=[1, 1]))


def test_blend_of_one_tokenizer_saved_twice_is_accepted(byte_corpora, tmp_path: Path) -> None:
    """Agreement is on what the ids mean, not on the file's bytes or name."""
    import json

    saved = json.loads(Path(byte_corpora[0] + ".tokenizer.json").read_text())
    Path(byte_corpora[1] + ".tokenizer.json").write_text(json.dumps(saved, indent=4))
    b = build(cfg(kind="prepared", prefixes=byte_corpora, weights=[1, 1]))
    assert b.vocab_size == 257


def test_explicit_tokenizer_must_match_the_sidecar(byte_corpora, bpe_tokenizer) -> None:
    with pytest.raises(DataError, match=f"data.tokenizer=.*bpe.json \\(vocab 300\\) is not the "
                       f"tokenizer {byte_corpora[0]} was prepared with"):
        build(cfg(kind="prepared", prefixes=byte_corpora[:1], tokenizer=bpe_tokenizer))


def test_prefix_without_sidecar(byte_corpora) -> None:
    """Without its .tokenizer.json a prefix is trusted only when data.tokenizer names the
    tokenizer, and then with a note."""
    with pytest.raises(DataError, match=f"{byte_corpora[1]} has no {byte_corpora[1]}"
                       ".tokenizer.json, so nothing says"):
        build(cfg(kind="prepared", prefixes=byte_corpora, weights=[1, 1]))
    b = build(cfg(kind="prepared", prefixes=byte_corpora, weights=[1, 1], tokenizer="bytes"))
    assert f"note: {byte_corpora[1]} has no .tokenizer.json beside it" in b.describe()


def test_blend_config_without_weights(byte_corpora) -> None:
    """Issue 13 #8: conf/data/blend.yaml marks weights required; they were silently by tokens."""
    blend = OmegaConf.structured(DataConfig(name="blend", kind="prepared", prefixes=byte_corpora,
                                            tokenizer="bytes"))
    with pytest.raises(DataError, match="data=blend needs data.weights, one per prefix"):
        build(blend)
    build(cfg(kind="prepared", prefixes=byte_corpora, tokenizer="bytes"))  # data=files may


@pytest.mark.parametrize("top,match", [
    (600, "c.bin holds token ids up to 599 but the model's vocab is 512; set model.vocab_size "
          "to at least 600"),
    (400, "c.bin holds token ids up to 399 but tokenizer bytes has 257 tokens: the data was "
          "prepared with another tokenizer"),
])
def test_token_ids_beyond_the_vocab(tmp_path: Path, write_docs, top, match) -> None:
    """Issue 13 #6: ids above the vocab ended in an IndexError deep in the embedding."""
    docs = [np.arange(50) for _ in range(30)]
    docs[17] = np.array([1, top - 1, 2])
    prefix = write_docs(tmp_path / "c", docs)
    with pytest.raises(DataError, match=match):
        build(cfg(kind="prepared", prefixes=[prefix], tokenizer="bytes"))


def test_token_range_is_cached_per_data_version(tmp_path: Path, write_docs) -> None:
    from neox.data.cache import token_range
    from neox.data.indexed import IndexedDataset

    prefix = write_docs(tmp_path / "c", [np.array([3, 9, 4])])
    assert token_range(IndexedDataset(prefix), tmp_path) == (3, 9)
    assert len(list(tmp_path.glob("c_*_tokens.json"))) == 1
    for ext in (".bin", ".idx"):  # same sizes, other tokens: the cached value must not be used
        Path(prefix + ext).unlink()
    write_docs(prefix, [np.array([3, 250, 4])])
    assert token_range(IndexedDataset(prefix), tmp_path) == (3, 250)


def test_negative_token_ids(tmp_path: Path, write_docs) -> None:
    prefix = write_docs(tmp_path / "c", [np.arange(40) for _ in range(20)] + [np.array([-1, 3])],
                        np.int32)
    with pytest.raises(DataError, match="c.bin holds token id -1; ids must be >= 0"):
        build(cfg(kind="prepared", prefixes=[prefix], tokenizer="bytes"))


def test_empty_prepared_data(tmp_path: Path, write_docs) -> None:
    prefix = write_docs(tmp_path / "e", [])
    with pytest.raises(DataError, match="e holds no tokens \\(0 documents\\)"):
        build(cfg(kind="prepared", prefixes=[prefix], tokenizer="bytes"))


def test_bytes_tokenizer_and_home_relative_paths(byte_corpora, monkeypatch) -> None:
    """Issue 13 #10: the worker reads `~` as the launcher does (it did not expand prefixes)."""
    home = Path(byte_corpora[0]).parent
    monkeypatch.setenv("HOME", str(home))
    b = build(cfg(kind="prepared", prefixes=["~/c1"], tokenizer="bytes",
                  cache_dir="~/cache"))
    assert b.sources[0].prefix == byte_corpora[1] and len(b.train) == 200
    assert list((home / "cache").glob("c1_train_*_doc_idx.npy"))


def test_training_with_a_bpe_spec_says_what_to_give(byte_corpora) -> None:
    with pytest.raises(DataError, match="bpe:VOCAB trains a tokenizer while preparing data"):
        build(cfg(kind="prepared", prefixes=byte_corpora[:1], tokenizer="bpe:300"))
