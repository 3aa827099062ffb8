"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, in that order
(the order and the definitions of Hugging Face's `generate`), then greedy or a seeded draw."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from neox.errors import ConfigError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus: the fewest tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    stop: List[str] = field(default_factory=list)  # stop strings (cut from the text)
    stop_tokens: List[int] = field(default_factory=list)  # stop token ids (besides the end-of-document)
    stop_at_eod: bool = True
    seed: int = 1234

    def check(self) -> None:
        """ConfigError naming the first setting out of its range."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 turns it off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as HF applies it: a seen token's logit is divided by `penalty` if positive, else
    multiplied. seen: [b, vocab] bool."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most probable tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens strictly more probable
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, seen: Optional[torch.Tensor], cfg: SamplingConfig,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """[b] next token ids from last-position logits [b, vocab] (fp32)."""
    if seen is not None:
        logits = penalize_repeats(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
