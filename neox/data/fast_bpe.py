"""tiktoken for the byte-level BPEs it can express exactly: the same ids as `tokenizers`, faster.

`tokenizers` and `tiktoken` run different BPE algorithms. `tokenizers` merges the adjacent pair
ranked first in the merges list; `tiktoken` merges the adjacent pair whose concatenated bytes have
the lowest rank, and takes a whole pre-tokenized piece that is in its vocabulary as one token. With
each token's rank = its id, they agree on every input when (checked by `build`):

1. merge results are distinct and their ids grow with the merge order, so "lowest merge rank" and
   "lowest id of the result" pick the same pair;
2. every merge result X is what `tokenizers` makes of X's bytes alone. Then no pair (p, q) that
   `tokenizers` can ever hold side by side has p+q in the vocabulary without (p, q) being its merge
   (the bytes under p and q evolve as X's bytes alone would, and would stop short of X), so both
   merge the same pair at every step, and the whole-piece shortcut gives what the merges give.

Around the model: no normalizer, or NFC (documents not already NFC go to `tokenizers`); the
ByteLevel pre-tokenizer with its GPT-2 regex and no prefix space; added tokens matched as written
(no lstrip/rstrip/single_word). tiktoken finds them itself when none can overlap another (then its
regex alternation finds what the leftmost-longest passes of `tokenizers` find); otherwise (e.g.
GPT-NeoX-20B's runs of 2-24 spaces) Python finds them as `tokenizers` does (non-normalized tokens
first, then normalized ones, each leftmost-longest) and tiktoken encodes the pieces between.
No truncation or padding.
The two regex engines (Oniguruma in `tokenizers`, fancy-regex in `tiktoken`) could still differ on
rare characters, so the caller also compares both on a sample of the corpus before trusting this.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from neox.data.tokenizer import _byte_to_unicode

if TYPE_CHECKING:  # imported when used: tiktoken only for the fast path
    import tiktoken
    import tokenizers

# The ByteLevel pre-tokenizer's split, as written in tokenizers (pre_tokenizers/byte_level.rs).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class NotExpressible(Exception):
    """The tokenizer does something tiktoken cannot do exactly; the message says what."""


class DocumentError(Exception):
    """Document `index` of a batch could not be tokenized."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"document {index}: {cause}")
        self.index = index
        self.cause = cause


@dataclass
class FastBPE:
    """A tiktoken Encoding giving the same ids as `hf` (a tokenizers.Tokenizer)."""

    encoding: tiktoken.Encoding
    hf: tokenizers.Tokenizer
    nfc: bool  # the tokenizer normalizes to NFC: documents not already NFC go to `hf`
    specials: frozenset[str]  # what tiktoken splits out: added tokens, or split's stand-ins
    split: "_Splitter | None" = None  # added tokens that can overlap: found in Python first

    def encode(self, texts: Sequence[str], eod_id: int, dtype: np.dtype
               ) -> tuple[np.ndarray, np.ndarray]:
        """(every document's ids followed by EOD, concatenated as `dtype`; tokens per document).

        Runs without the GIL for the most part (tiktoken releases it), so several threads can
        encode batches at once. Raises DocumentError naming the document that fails.
        """
        eod = np.array([eod_id], dtype=np.uint32)
        parts: list[np.ndarray] = []
        for i, text in enumerate(texts):
            try:
                if self.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
                    ids = np.array(self.hf.encode(text, add_special_tokens=False).ids, np.uint32)
                elif self.split is not None:
                    ids = self.split.encode(text, self)
                else:
                    ids = self.encoding.encode_to_numpy(text, allowed_special=self.specials,
                                                        disallowed_special=())
            except Exception as e:  # a lone surrogate (UnicodeEncodeError, TypeError), ...
                raise DocumentError(i, e) from None
            parts += (ids, eod)
        if not parts:
            return np.zeros(0, dtype), np.zeros(0, np.int64)
        lengths = np.fromiter((len(p) for p in parts[::2]), np.int64, len(texts)) + 1
        # uint32 -> the file's dtype in the copy itself; ids are < vocab size, which the dtype fits
        return np.concatenate(parts, dtype=dtype, casting="unsafe"), lengths


def build(hf: tokenizers.Tokenizer) -> FastBPE:
    """The tiktoken equivalent of `hf`; raises NotExpressible saying why there is none."""
    import tiktoken

    spec = json.loads(hf.to_str())
    nfc = _check_pipeline(spec)
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    byte_chars = _byte_to_unicode()
    missing = [b for b, c in byte_chars.items() if c not in vocab]
    if missing:
        raise NotExpressible(f"byte {missing[0]} ({byte_chars[missing[0]]!r}) is not in the vocab")
    try:
        results = ["".join(pair) for pair in merges]
        ids = np.array([vocab[x] for x in results], np.int64)
        if any(len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab for pair in merges):
            raise KeyError
    except KeyError:
        raise NotExpressible("a merge names tokens outside the vocab") from None
    if len(ids) and (np.diff(ids) <= 0).any():
        n = int(np.flatnonzero(np.diff(ids) <= 0)[0]) + 1
        raise NotExpressible(f"merge {n} makes {results[n]!r} (id {ids[n]}), not above the id "
                             "of the merge before it: ids do not follow the merge order")
    ranks = {bytes([b]): vocab[c] for b, c in byte_chars.items()}
    ranks.update(zip(_as_bytes(results), ids.tolist()))
    if len(ranks) != 256 + len(results):
        raise NotExpressible("two merges make the same bytes")
    if model.get("ignore_merges"):  # tokenizers takes any vocab token whole, tiktoken its ranks
        made = {*results, *byte_chars.values(), *(t["content"] for t in spec["added_tokens"])}
        if set(vocab) - made:
            raise NotExpressible("ignore_merges with vocab tokens that no merge makes")
    _check_self_consistent(vocab, merges, results, ids)
    specials, overlap = _added_tokens(spec["added_tokens"])
    split = _Splitter(spec["added_tokens"]) if overlap else None
    if split is not None:
        specials = split.specials
    try:
        enc = tiktoken.Encoding(f"neox-{id(hf):x}", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                special_tokens=specials)
    except Exception as e:  # tiktoken asserts on duplicate ranks, ...
        raise NotExpressible(f"tiktoken refused the vocab ({type(e).__name__}: {e})") from None
    return FastBPE(enc, hf, nfc, frozenset(specials), split)


def _check_pipeline(spec: dict) -> bool:
    """Check everything around the BPE model; True when documents are NFC-normalized first."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotExpressible(f"the model is {model.get('type')}, not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotExpressible(f"the BPE sets {key}={model[key]!r}")
    if model.get("byte_fallback"):
        raise NotExpressible("the BPE uses byte_fallback")
    for key in ("truncation", "padding"):
        if spec.get(key):
            raise NotExpressible(f"the tokenizer sets {key}")
    norm = spec.get("normalizer")
    if norm and norm.get("type") == "Sequence" and len(norm.get("normalizers", [])) == 1:
        norm = norm["normalizers"][0]
    if norm and norm.get("type") != "NFC":
        raise NotExpressible(f"the {norm.get('type')} normalizer")
    pre = spec.get("pre_tokenizer")
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if not pre or pre.get("type") != "ByteLevel":
        raise NotExpressible(f"the pre-tokenizer is {pre and pre.get('type')}, not ByteLevel")
    if pre.get("add_prefix_space"):
        raise NotExpressible("the ByteLevel pre-tokenizer adds a prefix space")
    if not pre.get("use_regex", True):
        raise NotExpressible("the ByteLevel pre-tokenizer does not split with its regex")
    return norm is not None


def _added_tokens(added: list[dict]) -> tuple[dict[str, int], bool]:
    """(the added tokens by content, whether two can overlap).

    tokenizers matches non-normalized added tokens first, then normalized ones, each pass
    leftmost-longest; tiktoken one regex alternation, leftmost-first in no set order. With no
    token inside another, and no overlap between tokens of different passes, both split the
    text alike; otherwise _Splitter does tokenizers' passes.
    """
    for t in added:
        for key in ("single_word", "lstrip", "rstrip"):
            if t.get(key):
                raise NotExpressible(f"added token {t['content']!r} sets {key}")
        if not t["content"]:
            raise NotExpressible("an added token is empty")
    overlap = len(added) > 200  # not worth checking every pair: _Splitter is exact anyway
    for i, a in enumerate([] if overlap else added):
        for b in added[i + 1:]:
            x, y = a["content"], b["content"]
            overlap = overlap or x in y or y in x or (
                _normalized(a) != _normalized(b) and _overlap(x, y))
    return {t["content"]: t["id"] for t in added}, overlap


def _normalized(token: dict) -> bool:
    """tokenizers' default: special tokens are matched as written, others after normalizing."""
    return token.get("normalized", not token.get("special", False))


def _overlap(x: str, y: str) -> bool:
    """A suffix of one is a prefix of the other."""
    return any(x.endswith(y[:k]) or y.endswith(x[:k]) for k in range(1, min(len(x), len(y))))


def _as_bytes(tokens: list[str]) -> list[bytes]:
    """Byte-level tokens (printable stand-ins for bytes) as the bytes they stand for."""
    table = {code: "\uffff" for code in range(256)}  # Latin-1 that is not byte-level: refused
    table.update({ord(c): b for b, c in _byte_to_unicode().items()})
    try:
        flat = "".join(tokens).translate(table).encode("latin-1")
    except UnicodeEncodeError:
        raise NotExpressible("a merge makes a token that is not in byte-level form") from None
    ends = np.cumsum([len(t) for t in tokens]).tolist()
    return [flat[a:b] for a, b in zip([0, *ends], ends)]


def _check_self_consistent(vocab: dict[str, int], merges: list[tuple], results: list[str],
                           ids: np.ndarray) -> None:
    """Condition 2 of the module docstring, checked with tokenizers' own BPE model.

    The merge results go through a few long texts split on spaces (no byte-level token holds
    one), which is much faster than one text per token.
    """
    if not results:
        return
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers

    bare = HFTok(models.BPE(vocab=vocab, merges=merges))
    bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    chunks = [" ".join(results[i:i + 8192]) for i in range(0, len(results), 8192)]
    got = [i for e in bare.encode_batch_fast(chunks, add_special_tokens=False) for i in e.ids]
    if len(got) != len(results) or not np.array_equal(got, ids):
        words = bare.encode_batch_fast(results, add_special_tokens=False)
        x, split = next((x, e.ids) for x, e in zip(results, words) if len(e.ids) != 1)
        raise NotExpressible(f"its merges split the vocab token {x!r} into "
                             f"{[bare.id_to_token(i) for i in split]}")


class _Splitter:
    """tokenizers' added-token passes in Python (non-normalized tokens, then normalized ones,
    each leftmost-longest: an alternation tried longest first). Each match becomes a stand-in
    character that tiktoken knows as a special token with the added token's id, so tiktoken
    encodes the text between stand-ins apart, as tokenizers pre-tokenizes each piece apart.
    The stand-ins are private-use characters of plane 16; a document holding one goes to
    tokenizers instead."""

    FIRST = 0x100000

    def __init__(self, added: list[dict]) -> None:
        if len(added) > 0xFFFE:
            raise NotExpressible(f"{len(added)} added tokens that can overlap")
        self.stand_in = {t["content"]: chr(self.FIRST + k) for k, t in enumerate(added)}
        self.specials = {self.stand_in[t["content"]]: t["id"] for t in added}
        if any(_PLANE16.search(t) for t in self.stand_in):
            raise NotExpressible("an added token holds a private-use character of plane 16")
        self.passes = []
        for normalized in (False, True):
            tokens = sorted((t["content"] for t in added if _normalized(t) == normalized),
                            key=len, reverse=True)
            if tokens:
                self.passes.append(re.compile("|".join(map(re.escape, tokens))))

    def encode(self, text: str, fast: FastBPE) -> np.ndarray:
        if _PLANE16.search(text):
            return np.array(fast.hf.encode(text, add_special_tokens=False).ids, np.uint32)
        for pattern in self.passes:
            text = pattern.sub(self._replace, text)
        return fast.encoding.encode_to_numpy(text, allowed_special=fast.specials,
                                             disallowed_special=())

    def _replace(self, match: re.Match) -> str:
        return self.stand_in[match.group()]


_PLANE16 = re.compile("[\U00100000-\U0010FFFF]")
