"""Batched autoregressive generation over `GPT.decode` and its KV cache.

Prompts of different lengths are left-padded to one length; each row keeps its own positions (the
cache's mask hides the padding), so a row's tokens do not depend on the others in its batch. Without
the cache (`use_cache=False`) every step recomputes the whole sequence: the reference the cache is
checked against, and the baseline `bench/generate.py` measures it against. Next tokens come only from
the tokenizer's vocabulary: the rows that pad the embedding can never be produced.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from neox.convert.tokenizer import ModelTokenizer
from neox.errors import ConfigError
from neox.generate.sampling import SamplingConfig, next_tokens
from neox.model.gpt import GPT

# logits of tokens [b, s] continuing the sequences in a KV cache (GPT.decode, or its tensor-parallel form)
DecodeFn = Callable[[torch.Tensor, object], torch.Tensor]


@dataclass
class Completion:
    prompt: str
    text: str  # the new text, cut at a stop string, without a stop token
    tokens: List[int]  # every new token, including one that stopped the row
    stop_reason: str  # eod | stop_token | stop_string | max_new_tokens | context


@dataclass
class Stats:
    rows: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


class Generator:
    def __init__(self, model: GPT, tokenizer: ModelTokenizer, device: torch.device,
                 decode: Optional[DecodeFn] = None, agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """decode: the model's logits (default GPT.decode; the tensor-parallel generator gathers its shards);
        agree: makes every process take the same next tokens (tensor parallelism: rank 0's)."""
        self.model, self.tok, self.device = model, tokenizer, device
        self.decode = decode or model.decode
        self.agree = agree or (lambda tokens: tokens)
        self.seq_len = model.cfg.seq_len
        self.vocab = tokenizer.vocab_size  # never sample the embedding's padding rows
        self.last_stats: Optional[Stats] = None

    @classmethod
    def load(cls, path: Path, tokenizer: Optional[str] = None, device: Optional[str] = None,
             dtype: Optional[str] = None) -> "Generator":
        """A generator for any model `neox.convert.source.load` reads (run, checkpoint, model or HF dir):
        bf16 on GPU, fp32 on CPU unless `dtype` says otherwise."""
        return cls(*load_for_inference(path, tokenizer, device, dtype))

    # ------------------------------------------------------------------------------------ prompts
    def encode(self, prompts: Sequence[str]) -> List[List[int]]:
        """Token ids of each prompt; an empty prompt starts from the end-of-document token. ConfigError for
        a prompt that leaves no room in the context."""
        out = []
        for i, p in enumerate(prompts):
            ids = self.tok.encode(p) or [self.tok.eod_id]
            if len(ids) >= self.seq_len:
                raise ConfigError(f"prompt {i + 1} is {len(ids)} tokens long; the model's context is {self.seq_len} "
                                  "tokens, which must hold the prompt and at least one new token: shorten it")
            out.append(ids)
        return out

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(self, prompts: List[List[int]], cfg: SamplingConfig, use_cache: bool = True) -> List[tuple]:
        """(new tokens, stop reason) per prompt."""
        cfg.check()
        b, longest = len(prompts), max(len(p) for p in prompts)
        total = min(self.seq_len, longest + cfg.max_new_tokens)
        pad = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        seq = torch.full((b, longest), self.tok.eod_id, dtype=torch.long, device=self.device)
        for r, p in enumerate(prompts):
            seq[r, longest - len(p):] = torch.tensor(p, device=self.device)
        stops = set(cfg.stop_tokens) | ({self.tok.eod_id} if cfg.stop_at_eod else set())
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(b, self.vocab, dtype=torch.bool, device=self.device)
            for r, p in enumerate(prompts):
                seen[r, torch.tensor(p, device=self.device)] = True
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        steps = total - longest
        new = torch.empty(b, steps, dtype=torch.long, device=self.device)
        stop_ids = torch.tensor(sorted(stops), device=self.device) if stops else None
        done = torch.zeros(b, dtype=torch.bool, device=self.device)  # a stop token was drawn
        cut: List[Optional[int]] = [None] * b  # stop strings: where each row ended (tokens kept)
        start = time.perf_counter()
        cache = self.model.new_cache(total if use_cache else longest, pad)
        logits = self.decode(seq, cache)[:, -1]
        n = 0
        for step in range(steps):
            nxt = self.agree(next_tokens(logits[:, : self.vocab].float(), seen, cfg, gen))
            new[:, step] = nxt
            n = step + 1
            if stop_ids is not None:
                done |= torch.isin(nxt, stop_ids)
            if cfg.stop:  # stop strings need the text: read the tokens every step
                self._cut_at_stop_strings(new[:, :n].tolist(), cut, cfg.stop)
                if all(c is not None or d for c, d in zip(cut, done.tolist())):
                    break
            elif stop_ids is not None and step % 8 == 7 and bool(done.all()):  # rarely: a sync stalls the device
                break
            if step == steps - 1:
                break
            if seen is not None:
                seen[torch.arange(b, device=self.device), nxt] = True
            if use_cache:
                logits = self.decode(nxt[:, None], cache)[:, -1]
            else:  # recompute everything: a fresh cache over the whole sequence
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits = self.decode(seq, self.model.new_cache(seq.shape[1], pad))[:, -1]
        rows = new[:, :n].tolist()  # waits for the device
        ran_out = "max_new_tokens" if longest + cfg.max_new_tokens <= self.seq_len else "context"
        results = []
        for r, tokens in enumerate(rows):
            first_stop = next((i for i, t in enumerate(tokens) if t in stops), None)
            if first_stop is not None and (cut[r] is None or first_stop < cut[r]):
                t = tokens[first_stop]
                why = "eod" if t == self.tok.eod_id and cfg.stop_at_eod else "stop_token"
                results.append((tokens[: first_stop + 1], why))
            elif cut[r] is not None:
                results.append((tokens[: cut[r] + 1], "stop_string"))
            else:
                results.append((tokens, ran_out))
        self.last_stats = Stats(b, sum(len(t) for t, _ in results), time.perf_counter() - start)
        return results

    def _cut_at_stop_strings(self, rows: List[List[int]], cut: List[Optional[int]], stops: List[str]) -> None:
        """Mark the rows whose text now holds a stop string (at the last token, the one that completed it)."""
        for r, tokens in enumerate(rows):
            if cut[r] is None and any(s in self.tok.decode(tokens) for s in stops):
                cut[r] = len(tokens) - 1

    def generate(self, prompts: Sequence[str], cfg: SamplingConfig, use_cache: bool = True,
                 ids: Optional[List[List[int]]] = None) -> List[Completion]:
        """Completions of text prompts (or of `ids`, their tokens as the caller cut them to fit)."""
        results = self.generate_ids(self.encode(prompts) if ids is None else ids, cfg, use_cache)
        out = []
        for prompt, (tokens, why) in zip(prompts, results):
            body = tokens[:-1] if why in ("eod", "stop_token") else tokens
            text = self.tok.decode(body)
            if why == "stop_string":
                text = text[: min(text.find(s) for s in cfg.stop if s in text)]
            out.append(Completion(prompt, text, tokens, why))
        return out


def load_for_inference(path: Path, tokenizer: Optional[str] = None, device: Optional[str] = None,
                       dtype: Optional[str] = None) -> tuple[GPT, ModelTokenizer, torch.device]:
    """(model in eval mode, its tokenizer, device) for any path `neox.convert.source.load` reads."""
    from neox.convert.source import check_vocab, load
    from neox.convert.tokenizer import load_model_tokenizer

    src = load(Path(path))
    tok = load_model_tokenizer(tokenizer or src.tokenizer, src.origin, src.eod_token)
    check_vocab(tok.vocab_size, src.cfg, tok.source)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return build_model(src.cfg, src.weights, dev, resolve_dtype(dtype, dev)), tok, dev


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"dtype={dtype} is not one of float32, bfloat16, float16")
    return table[dtype]


def build_model(cfg, weights: dict, device: torch.device, dtype: torch.dtype) -> GPT:
    """GPT(cfg) on `device` in `dtype` holding `weights` (a full GPT state dict), in eval mode."""
    with torch.device(device):
        model = GPT(cfg)
    model.load_state_dict(weights)
    return model.to(dtype).eval()
