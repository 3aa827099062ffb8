"""The tiktoken fast path: the same ids as `tokenizers` wherever it is used, and a fallback elsewhere.

The reference is always `tokenizers` itself (encode_batch_fast, the path prepare used before).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        trainers)

from neox.data import fast_bpe
from neox.data.indexed import IndexedDataset
from neox.data.prepare import prepare
from neox.errors import DataError

EOD = "<|endoftext|>"


def corpus() -> list[str]:
    """Unicode of many scripts, whitespace runs of every kind, the EOD string inside text."""
    rng = random.Random(0)
    fixed = [
        "def f(x):\n\treturn x  +  1\n\n\n    # trailing   \n",
        "héllo wörld ✓ — naïve café; e\u0301 (decomposed) Å vs A\u030a",
        "日本語のテキスト、中文文本。한국어 텍스트 العربية עברית हिन्दी ไทย",
        "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷 skin 👍🏽 zero\u200bwidth",
        f"before{EOD}after and {EOD} spaced, {EOD}{EOD} twice, <|endoftext| partial",
        f"{EOD} at the start",
        f"at the end {EOD}",
        "spaces" + " " * 300 + "x\t\t\t\ty\n\n\n\n\r\n\r\nz" + "\u3000\u3000\u00a0\u2028\u2029\x85\x0b\x0c",
        "it's we're they've I'm you'll he'd IT'S 'quoted' ''",
        "numbers 123 4567 ١٢٣ ๑๒๓ ²³ ½ 3.14159e-10 0x1F",
        "\x00\x01 control \x7f chars \ufeff BOM \ufffd replacement",
        "",
        " ",
        "\n",
        "ÀÉÎÕÜ ñ ß ﬁ ligature Ⅻ Ω Ω",
    ]
    pool = [chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c <= 0xDFFF]
    pool += [" ", "\n", "\t", "  ", EOD, "'s", "1", "a", "\u3000", "𝔘𝔫𝔦", "😀"]
    randoms = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 400))) for _ in range(300)]
    return fixed + randoms


def train(texts: list[str], vocab: int = 700, eod_last: bool = False) -> Tokenizer:
    """A byte-level BPE; `eod_last`: EOD added after training, GPT-2 style (the last id)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[] if eod_last else [EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if eod_last:
        tok.add_special_tokens([EOD])
    return tok


def reference(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def fast_ids(fast: fast_bpe.FastBPE, texts: list[str], eod: int) -> list[list[int]]:
    flat, lengths = fast.encode(texts, eod, np.dtype(np.int64))
    ends = np.cumsum(lengths)
    assert (flat[ends - 1] == eod).all()
    return [flat[e - n:e - 1].tolist() for e, n in zip(ends, lengths)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.mark.parametrize("style", ["neox", "gpt2", "neox20b"])
def test_same_ids_as_tokenizers(texts: list[str], style: str) -> None:
    tok = train(texts, eod_last=style == "gpt2")
    if style == "gpt2":  # GPT-2's tokenizer.json writes merges as "a b" strings
        spec = json.loads(tok.to_str())
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
        tok = Tokenizer.from_str(json.dumps(spec))
    if style == "neox20b":  # GPT-NeoX-20B: NFC, <|padding|>, runs of 2-24 spaces as added tokens
        tok.normalizer = normalizers.NFC()
        tok.add_special_tokens(["<|padding|>"])
        # "<|end" lies inside EOD; "e<|" overlaps "before<|endoftext|>": tokenizers matches EOD
        # (not normalized) first, so "e<|" never matches there
        tok.add_tokens([" " * n for n in range(24, 1, -1)] + ["<|end", "e<|"])
    fast = fast_bpe.build(tok)
    assert fast.nfc == (style == "neox20b")
    assert (fast.split is not None) == (style == "neox20b")  # overlapping added tokens
    eod = tok.token_to_id(EOD)
    ours, ref = fast_ids(fast, texts, eod), reference(tok, texts)
    for text, a, b in zip(texts, ours, ref):
        assert a == b, repr(text[:80])
    assert any(eod in r for r in ref)  # the EOD string inside text became the EOD id


def test_prepare_fast_path_equals_tokenizers_path(tmp_path: Path, texts: list[str]) -> None:
    tok = train(texts)
    tok.save(str(tmp_path / "tok.json"))
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for encoder in ("auto", "tokenizers"):
        prepare([str(corpus_file)], str(tmp_path / encoder), str(tmp_path / "tok.json"),
                encoder=encoder, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"auto{ext}").read_bytes() == (tmp_path / f"tokenizers{ext}").read_bytes()
    meta = json.loads((tmp_path / "auto.meta.json").read_text())
    assert meta["encoder"] == "tiktoken"
    assert json.loads((tmp_path / "tokenizers.meta.json").read_text())["encoder"] == "tokenizers"
    assert len(IndexedDataset(tmp_path / "auto")) == len(texts)


def _set_pre_tokenizer(tok: Tokenizer, **kw) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(**kw)
    return tok


@pytest.mark.parametrize("change, why", [
    (lambda t: _set_pre_tokenizer(t, add_prefix_space=True), "prefix space"),
    (lambda t: _set_pre_tokenizer(t, add_prefix_space=False, use_regex=False), "regex"),
    (lambda t: setattr(t, "normalizer", normalizers.Lowercase()) or t, "Lowercase"),
    (lambda t: t.add_tokens([AddedToken("<x>", lstrip=True)]) and t, "sets lstrip"),
    (lambda t: t.enable_truncation(16) or t, "truncation"),
])
def test_not_expressible(texts: list[str], change, why: str) -> None:
    tok = change(train(texts[:50], vocab=400))
    with pytest.raises(fast_bpe.NotExpressible, match=why):
        fast_bpe.build(tok)


def _tiny(merges: list[tuple[str, str]], extra: list[str]) -> Tokenizer:
    from neox.data.tokenizer import _byte_to_unicode

    vocab = {c: i for i, c in enumerate(_byte_to_unicode().values())}
    for t in extra:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def test_merges_that_tiktoken_would_misread() -> None:
    """'abc' made by (a, bc) while (a, b) ranks first: tokenizers never reaches 'abc' from its
    bytes, but tiktoken would take the whole piece. The check catches it; without the check
    tiktoken really gives other ids (so the check is not vacuous)."""
    tok = _tiny([("a", "b"), ("b", "c"), ("a", "bc")], ["ab", "bc", "abc"])
    with pytest.raises(fast_bpe.NotExpressible, match="split the vocab token 'abc'"):
        fast_bpe.build(tok)
    import tiktoken

    vocab = tok.get_vocab()
    ranks = {t.encode(): vocab[t] for t in ("a", "b", "c", "ab", "bc", "abc")}
    enc = tiktoken.Encoding("t", pat_str=fast_bpe.GPT2_SPLIT, mergeable_ranks=ranks,
                            special_tokens={})
    assert enc.encode("abc") == [vocab["abc"]]
    assert reference(tok, ["abc"])[0] == [vocab["ab"], vocab["c"]]


def test_ids_out_of_merge_order() -> None:
    tok = _tiny([("b", "c"), ("a", "b")], ["ab", "bc"])  # 'bc' merges first but has the larger id
    with pytest.raises(fast_bpe.NotExpressible, match="ids do not follow the merge order"):
        fast_bpe.build(tok)


def test_inexpressible_tokenizer_falls_back(tmp_path: Path, texts: list[str],
                                            capsys: pytest.CaptureFixture) -> None:
    tok = _set_pre_tokenizer(train(texts[:80], vocab=400), add_prefix_space=True)
    tok.save(str(tmp_path / "tok.json"))
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:80]))
    r = prepare([str(corpus_file)], str(tmp_path / "out"), str(tmp_path / "tok.json"))
    err = capsys.readouterr().err
    assert "encoder: tokenizers (tiktoken cannot express this tokenizer exactly: the ByteLevel " \
           "pre-tokenizer adds a prefix space)" in err
    assert json.loads((tmp_path / "out.meta.json").read_text())["encoder"] == "tokenizers"
    ds = IndexedDataset(tmp_path / "out")
    assert [ds[i][:-1].tolist() for i in range(r.documents)] == reference(tok, texts[:80])
    with pytest.raises(DataError, match="--encoder tiktoken: tiktoken cannot express .* prefix"):
        prepare([str(corpus_file)], str(tmp_path / "forced"), str(tmp_path / "tok.json"),
                encoder="tiktoken", progress=False)


def test_sample_mismatch_warns_once_and_uses_tokenizers(
        tmp_path: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """A fast path that passes the static checks but disagrees on the corpus (here: made to
    read the EOD string as text) is caught on the first documents."""
    tok = train(texts)
    tok.save(str(tmp_path / "tok.json"))
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    real_build = fast_bpe.build

    def wrong_build(hf):
        fast = real_build(hf)
        fast.specials = frozenset()
        return fast

    monkeypatch.setattr(fast_bpe, "build", wrong_build)
    prepare([str(corpus_file)], str(tmp_path / "out"), str(tmp_path / "tok.json"),
            progress=False)
    err = capsys.readouterr().err
    assert err.count("warning: tiktoken and tokenizers disagree on") == 1
    assert f"{corpus_file}:5 (token " in err  # the first document holding the EOD string
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["encoder"] == "tokenizers"
    ds = IndexedDataset(tmp_path / "out")
    assert [ds[i][:-1].tolist() for i in range(len(ds))] == reference(tok, texts)
    with pytest.raises(DataError, match="tiktoken and tokenizers disagree on"):
        prepare([str(corpus_file)], str(tmp_path / "forced"), str(tmp_path / "tok.json"),
                encoder="tiktoken", progress=False)
    # A document neither can encode, first in the sample, does not hide the others' difference.
    corpus_file.write_text('{"text": "\\ud800"}\n' + corpus_file.read_text())
    with pytest.raises(DataError, match=r":1: the tokenizer cannot encode this document"):
        prepare([str(corpus_file)], str(tmp_path / "bad"), str(tmp_path / "tok.json"),
                progress=False)
    assert f"{corpus_file}:6 (token " in capsys.readouterr().err


@pytest.mark.parametrize("encoder", ["tiktoken", "tokenizers"])
def test_document_the_tokenizer_cannot_encode(tmp_path: Path, texts: list[str],
                                              encoder: str) -> None:
    """A lone surrogate (a valid JSON escape) cannot be encoded: the error names file:line."""
    tok = train(texts[:50], vocab=400)
    tok.save(str(tmp_path / "tok.json"))
    corpus_file = tmp_path / "c.jsonl"
    big = "".join(json.dumps({"text": "x = 1\n" * 8000}) + "\n" for _ in range(3))  # 3 tasks
    corpus_file.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + big +
                           '{"text": "bad \\ud800"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(corpus_file))}:6: the tokenizer "
                                        r"cannot encode this document \(it holds the lone "
                                        r"surrogate '\\ud800' at character 4, .*\); fix or "
                                        "remove it$"):
        prepare([str(corpus_file)], str(tmp_path / "out"), str(tmp_path / "tok.json"),
                encoder=encoder, progress=False)
    assert not list(tmp_path.glob("out*"))
