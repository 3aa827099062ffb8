"""Tokenizers: the bytes tokenizer's saved tokenizer.json, BPE training, EOD lookup, bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from neox.data.tokenizer import (BytesTokenizer, encode_documents, load_tokenizer, train_bpe)
from neox.errors import DataError

TEXT = ["héllo wörld\n\tdef f(x): return x ** 2  # ✓", "", "\x00\x7f plain ascii"]


def test_bytes_tokenizer_json_is_equivalent(tmp_path: Path) -> None:
    BytesTokenizer().save(tmp_path / "bytes.json")
    hf = Tokenizer.from_file(str(tmp_path / "bytes.json"))
    assert hf.get_vocab_size() == 257 and hf.token_to_id("<|endoftext|>") == 256
    for text in TEXT:
        ids = hf.encode(text).ids
        assert ids == list(text.encode("utf-8"))
        assert hf.decode(ids) == text
    loaded = load_tokenizer(str(tmp_path / "bytes.json"))
    assert (loaded.vocab_size, loaded.eod_id) == (257, 256)


def test_encode_documents_appends_eod() -> None:
    flat, lengths = encode_documents(BytesTokenizer(), ["ab", "", "c"])
    assert lengths.tolist() == [3, 1, 2]
    assert flat.tolist() == [97, 98, 256, 256, 99, 256]


def test_train_bpe_round_trip(tmp_path: Path) -> None:
    corpus = [f"def function_{i}(value):\n    return value * {i}\n" for i in range(300)]
    tok = train_bpe(corpus, 300)
    assert tok.vocab_size == 300 and tok.eod_id == 0
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(str(tmp_path / "t.json"))
    ids = again.encode_batch(TEXT)
    hf = Tokenizer.from_file(str(tmp_path / "t.json"))
    assert [hf.decode(i.tolist()) for i in ids] == TEXT
    assert isinstance(ids[0], np.ndarray)


def test_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_no_eod_token(tmp_path: Path) -> None:
    from tokenizers import models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "w.json"))
    with pytest.raises(DataError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path / "w.json"))
    assert load_tokenizer(str(tmp_path / "w.json"), eod_token="a").eod_id == 0
