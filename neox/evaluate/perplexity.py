"""Per-token loss and perplexity of a model on a split of prepared (.bin/.idx) data.

The split's documents (each ending in its end-of-document token, as prepared) are concatenated and cut
into non-overlapping windows of seq_len + 1 tokens, as training samples are: every token after the first
is predicted once, from the tokens before it in its window. Probabilities are normalized over the
tokenizer's vocabulary (the embedding's padding rows are not tokens), as in the exported model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from neox.errors import ConfigError, DataError


@dataclass
class DataSpec:
    prefixes: List[str] = field(default_factory=list)  # prepared .bin/.idx paths without extension
    split: str = "969,30,1"  # train,valid,test proportions, by documents (as the run's data.split)


@dataclass
class PerplexityConfig:
    data: DataSpec = field(default_factory=DataSpec)
    split: str = "valid"  # train | valid | test
    batch_size: int = 8
    max_tokens: Optional[int] = None  # stop each prefix after this many predicted tokens
    seq_len: Optional[int] = None  # window length; None: the model's context
    tokenizer: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None


@dataclass
class Score:
    name: str
    tokens: int
    nll: float  # summed, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def split_tokens(prefix: str, split_spec: str, split: str, limit: Optional[int]) -> np.ndarray:
    """The tokens of one split's documents, concatenated (at most limit + 1)."""
    from neox.data.indexed import IndexedDataset, exists
    from neox.data.sampling import SPLITS, split_ranges

    if split not in SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(SPLITS)}")
    if not exists(prefix):
        raise DataError(f"{prefix}.bin/.idx not found; give data.prefixes the prepared paths without extension")
    data = IndexedDataset(prefix)
    lo, hi = split_ranges(len(data), split_spec)[split]
    if hi <= lo:
        raise DataError(f"{prefix}: the {split} split of data.split={split_spec} holds no documents")
    parts, n = [], 0
    for i in range(lo, hi):
        parts.append(np.asarray(data[i], dtype=np.int64))
        n += len(parts[-1])
        if limit is not None and n > limit:
            break
    tokens = np.concatenate(parts)
    return tokens[: limit + 1] if limit is not None else tokens


def windows(tokens: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
    for start in range(0, len(tokens) - 1, seq_len):
        yield tokens[start:start + seq_len + 1]


@torch.no_grad()
def score_tokens(model, tokens: np.ndarray, vocab: int, seq_len: int, batch_size: int,
                 device: torch.device, name: str) -> Score:
    """Summed next-token loss over `tokens` in windows of seq_len + 1 (full windows batched)."""
    if tokens.max(initial=0) >= vocab:
        raise DataError(f"{name} holds token id {int(tokens.max())}, beyond the tokenizer's {vocab}: it was "
                        "prepared with another tokenizer")
    nll, count = 0.0, 0
    pending: List[np.ndarray] = []

    def flush() -> None:
        nonlocal nll, count
        batch = torch.from_numpy(np.stack(pending)).to(device)
        logits = model(batch[:, :-1])[..., :vocab].float()
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
        pending.clear()

    for w in windows(tokens, seq_len):
        if pending and len(w) != len(pending[0]):
            flush()
        pending.append(w)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return Score(name, count, nll)


def perplexity(model, tok_vocab: int, cfg: PerplexityConfig, device: torch.device) -> List[Score]:
    """A score per prefix, then (with several) the token-weighted total."""
    if not cfg.data.prefixes:
        raise ConfigError("give the data: data.prefixes=[path/to/prefix,...] (prepared .bin/.idx, no extension)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")
    seq_len = cfg.seq_len or model.cfg.seq_len
    if not 1 <= seq_len <= model.cfg.seq_len:
        raise ConfigError(f"seq_len={seq_len} must be in [1, {model.cfg.seq_len}] (the model's context)")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ConfigError(f"max_tokens={cfg.max_tokens} must be at least 1")
    scores = [score_tokens(model, split_tokens(p, cfg.data.split, cfg.split, cfg.max_tokens), tok_vocab, seq_len,
                           cfg.batch_size, device, p) for p in cfg.data.prefixes]
    if len(scores) > 1:
        scores.append(Score("all", sum(s.tokens for s in scores), sum(s.nll for s in scores)))
    return scores
