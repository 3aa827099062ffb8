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
    assert "c0: 300 docs (291/9/0" in b.describe()


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
