"""Tokenizers for preparing data: an HF tokenizer.json, a byte-level BPE trained here, or bytes.

Every tokenizer can be saved as an HF `tokenizer.json`, so whatever reads the data later
(the trainer, generation) always loads one kind of file. The bytes tokenizer is saved as a
byte-level BPE with no merges, whose ids are exactly the byte values (and 256 for EOD).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from neox.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens we recognise in tokenizers brought by the user, most common first.
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to U+0100 and up,
    in byte order. HF's ByteLevel pre-tokenizer uses the same map.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


class Tokenizer:
    """What preparation needs from a tokenizer: batch encoding to numpy, vocab size, EOD id."""

    name: str
    vocab_size: int
    eod_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write an HF tokenizer.json equivalent to this tokenizer."""
        self.hf().save(str(path))

    def hf(self) -> "tokenizers.Tokenizer":  # noqa: F821
        """The equivalent HF tokenizer."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash of the id -> token map: equal exactly when the same ids mean the same tokens,
        however the tokenizer.json was written (field order, tokenizers version, file name)."""
        vocab = sorted(self.hf().get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    def __init__(self, tok: "tokenizers.Tokenizer", name: str,  # noqa: F821
                 eod_token: str | None = None) -> None:
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        candidates = (eod_token,) if eod_token else _EOD_CANDIDATES
        ids = [tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(f"tokenizer {name} has no end-of-document token (looked for "
                            f"{', '.join(candidates)}); pass --eod-token or add {EOD_TOKEN}")
        self.eod_id = found[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch_fast skips character offsets (~30% faster); special tokens such as
        # <|endoftext|> written in the text are NOT added by the post-processor here.
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int32) for e in encs]

    def hf(self) -> "tokenizers.Tokenizer":  # noqa: F821
        return self.tok


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255, EOD = 256. No training, no vocabulary file needed."""

    name = "bytes"
    vocab_size = 257
    eod_id = 256

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32)
                for t in texts]

    def hf(self) -> "tokenizers.Tokenizer":  # noqa: F821
        from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

        chars = _byte_to_unicode()
        vocab = {chars[b]: b for b in range(256)}
        tok = HFTok(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOD_TOKEN])  # gets id 256, the next free one
        return tok


def load_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """`"bytes"`, the path of an HF tokenizer.json, or a folder holding one (`~` expanded)."""
    if spec == "bytes":
        return BytesTokenizer()
    if spec.startswith("bpe:"):
        raise DataError(f"tokenizer {spec}: bpe:VOCAB trains a tokenizer while preparing data; "
                        "to read prepared data give the tokenizer.json preparing wrote "
                        "(<prefix>.tokenizer.json)")
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer {spec} not found; give 'bytes', the path of an HF "
                        "tokenizer.json, or a folder holding one (hub names are not downloaded: "
                        "save one with tokenizers' Tokenizer.from_pretrained(name).save(path))")
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{path} is not a valid HF tokenizer.json ({e}); "
                        "re-save it with tokenizers' Tokenizer.save") from e
    return HFTokenizer(tok, str(path), eod_token)


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE with `<|endoftext|>` as its last special token."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"BPE vocab size {vocab_size} is below 257 (256 bytes + EOD); "
                        "choose a larger vocab or the bytes tokenizer")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return HFTokenizer(tok, f"bpe-{vocab_size}", EOD_TOKEN)


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents, append EOD to each: (all tokens concatenated, length of each)."""
    docs = tok.encode_batch(texts)
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    flat[ends - 1] = tok.eod_id
    for d, end in zip(docs, ends):
        flat[end - 1 - len(d):end - 1] = d
    return flat, lengths
