"""From a DataConfig to train/valid/test sample datasets: the one entry point the trainer calls.

Rank choreography: the builder rank prepares what is missing (the embedded corpus, the index
arrays); every other rank only validates, so a bad config fails on every rank instead of
leaving the others stuck at the barrier. Then everyone meets at `barrier()` once and loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from neox.data.cache import cache_folder, token_range
from neox.data.embedded import corpus_dir, ensure_embedded
from neox.data.indexed import IndexedDataset
from neox.data.sampling import (SPLITS, BlendedDataset, GPTDataset, IndexSpec, blend_indices,
                                check_weights, split_ranges)
from neox.data.tokenizer import load_tokenizer
from neox.errors import DataError

SampleDataset = Union[GPTDataset, BlendedDataset]


@dataclass
class Source:
    prefix: str
    weight: float  # normalised over all sources
    sequences: int  # what is sampled and split (one per document in files neox prepares)
    documents: int  # from the .idx document index; more sequences than documents with sentence splitting
    tokens: int
    split_sequences: dict[str, int]


@dataclass
class DataBundle:
    train: SampleDataset | None
    valid: SampleDataset | None
    test: SampleDataset | None
    vocab_size: int  # the tokenizer's, before any padding of the model's embedding
    tokenizer_path: str
    eod_id: int
    sources: list[Source] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # behaviour changes the user should hear

    def describe(self) -> str:
        samples = ", ".join(f"{name} {len(ds) if ds is not None else 0}"
                            for name, ds in zip(SPLITS, (self.train, self.valid, self.test)))
        lines = [f"data: {len(self.sources)} source(s), tokenizer {self.tokenizer_path} "
                 f"(vocab {self.vocab_size}, eod {self.eod_id}); samples: {samples}"]
        for s in self.sources:
            split = "/".join(str(s.split_sequences[name]) for name in SPLITS)
            count = (f"{s.sequences} documents" if s.sequences == s.documents
                     else f"{s.sequences} sequences ({s.documents} documents)")
            lines.append(f"  {s.prefix}: {count} ({split} train/valid/test), "
                         f"{s.tokens / 1e6:.2f} M tokens, weight {s.weight:.3f}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_prepared(cfg: Any) -> tuple[list[str], str, list[str]]:
    """(prefixes with `~` expanded, the tokenizer, warnings) for data.kind=prepared.

    Refuses a blend whose parts were prepared with different tokenizers: their ids mean different
    tokens. Each prefix's tokenizer is its `<prefix>.tokenizer.json` (written by neox.data.prepare);
    data.tokenizer, when set, must agree with every one of them. A prefix without that file
    (prepared by another tool) is trusted only when data.tokenizer names the tokenizer, with a
    warning, and its token ids are still checked against the vocab.
    """
    prefixes = [os.path.expanduser(str(p)) for p in cfg.prefixes]
    if not prefixes:
        raise DataError("data.kind=prepared needs data.prefixes: the .bin/.idx paths "
                        "without extension")
    if cfg.name == "blend" and cfg.weights is None:
        raise DataError("data=blend needs data.weights, one per prefix (e.g. "
                        "data.weights=[0.3,0.7]); use data=files to weight by token count")
    if cfg.weights is not None:
        check_weights(list(cfg.weights), len(prefixes))
    sidecars = {p: Path(p + ".tokenizer.json") for p in prefixes
                if Path(p + ".tokenizer.json").is_file()}
    if cfg.tokenizer:
        spec, first = str(cfg.tokenizer), None
        spec = spec if spec == "bytes" else os.path.expanduser(spec)  # as the launcher reads it
    elif sidecars:
        first = next(iter(sidecars))
        spec = str(sidecars[first])
    else:
        raise DataError(f"no tokenizer for {prefixes[0]} (no {prefixes[0]}.tokenizer.json): set "
                        "data.tokenizer to the tokenizer.json (or 'bytes') the data was prepared "
                        "with")
    tok = load_tokenizer(spec)
    warnings = []
    for prefix in prefixes:
        if prefix in sidecars:
            other = load_tokenizer(str(sidecars[prefix]))
            if other.fingerprint() == tok.fingerprint():
                continue
            theirs = f"{sidecars[prefix]}, vocab {other.vocab_size}"
            if first is None:
                raise DataError(f"data.tokenizer={cfg.tokenizer} (vocab {tok.vocab_size}) is not "
                                f"the tokenizer {prefix} was prepared with ({theirs}); drop "
                                "data.tokenizer to use that one, or re-prepare the data with it")
            raise DataError(f"data.prefixes mix tokenizers: {first} was prepared with {spec} "
                            f"(vocab {tok.vocab_size}) and {prefix} with another ({theirs}); "
                            "their token ids mean different things: re-prepare one with the "
                            "other's tokenizer (-t <its .tokenizer.json>)")
        if first is not None:
            raise DataError(f"{prefix} has no {prefix}.tokenizer.json, so nothing says it was "
                            f"prepared with the tokenizer of {first} ({spec}); set "
                            "data.tokenizer to the tokenizer every prefix was prepared with")
        warnings.append(f"{prefix} has no .tokenizer.json beside it: trusting data.tokenizer="
                        f"{cfg.tokenizer} for it (its token ids are still checked)")
    return prefixes, spec, warnings


def build_datasets(data_cfg: Any, *, seq_len: int, num_samples: dict[str, int], seed: int,
                   model_vocab_size: int, is_builder: bool,
                   barrier: Callable[[], None], progress: bool = False) -> DataBundle:
    """Sample datasets per split; a split that has no documents or no samples asked is None.
    `progress`: progress bars on the long work before training (building the embedded corpus)."""
    if data_cfg.kind == "embedded":
        vocab = int(data_cfg.embedded_vocab)
        check_vocab(vocab, model_vocab_size, "the embedded corpus BPE (data.embedded_vocab)")
        prefixes, warnings = [str(corpus_dir(vocab) / "data")], []
        tokenizer_path = str(corpus_dir(vocab) / "tokenizer.json")
        if is_builder:
            ensure_embedded(vocab, progress=progress)
    elif data_cfg.kind == "prepared":
        prefixes, tokenizer_path, warnings = resolve_prepared(data_cfg)
    else:
        raise DataError(f"unknown data.kind {data_cfg.kind!r}; use 'embedded' or 'prepared'")

    # Ranks that can see the data validate it before the barrier, so a bad config fails on
    # every rank at once; the embedded corpus only exists once the builder has made it.
    def plan() -> tuple[list[Source], dict[str, _SplitPlan]]:
        return plan_sources(data_cfg, prefixes, tokenizer_path, seq_len, num_samples, seed,
                            model_vocab_size)

    planned = plan() if is_builder or data_cfg.kind == "prepared" else None
    if is_builder:
        for split in planned[1].values():
            for data, spec in split.parts:
                spec.build(data)
    barrier()
    sources, splits = planned or plan()

    tok = load_tokenizer(tokenizer_path)
    datasets = {name: splits[name].load() for name in SPLITS}
    notes = warnings + [n for name in SPLITS for n in splits[name].notes]
    return DataBundle(datasets["train"], datasets["valid"], datasets["test"], tok.vocab_size,
                      tokenizer_path, tok.eod_id, sources, notes)


def check_vocab(vocab: int, model_vocab: int, what: str) -> None:
    if vocab > model_vocab:
        raise DataError(f"{what} has {vocab} tokens but the model's vocab is {model_vocab}; "
                        "raise model.vocab_size or use a smaller tokenizer")


def _check_token_ids(data: IndexedDataset, cache: Path, tokenizer: str, vocab: int,
                     model_vocab: int) -> None:
    """Every token id must index the embedding, and be a token of the tokenizer."""
    lo, hi = token_range(data, cache)
    where = f"{data.prefix}.bin"
    if lo < 0:
        raise DataError(f"{where} holds token id {lo}; ids must be >= 0: the file is corrupt or "
                        "its dtype code is wrong, re-prepare it")
    if hi >= model_vocab:
        raise DataError(f"{where} holds token ids up to {hi} but the model's vocab is "
                        f"{model_vocab}; set model.vocab_size to at least {hi + 1}, or check the "
                        f"data was prepared with tokenizer {tokenizer} ({vocab} tokens)")
    if hi >= vocab:
        raise DataError(f"{where} holds token ids up to {hi} but tokenizer {tokenizer} has "
                        f"{vocab} tokens: the data was prepared with another tokenizer; set "
                        "data.tokenizer to that one")


@dataclass
class _SplitPlan:
    """One split: the (data, index spec) per source that has samples, and blend arrays."""

    parts: list[tuple[IndexedDataset, IndexSpec]]
    weights: list[float]
    blend: tuple[np.ndarray, np.ndarray] | None
    notes: list[str]

    def load(self) -> SampleDataset | None:
        if not self.parts:
            return None
        datasets = [GPTDataset(data, spec) for data, spec in self.parts]
        if self.blend is None:
            return datasets[0]
        return BlendedDataset(datasets, *self.blend, self.weights)


def plan_sources(cfg: Any, prefixes: list[str], tokenizer_path: str, seq_len: int,
                 num_samples: dict[str, int], seed: int, model_vocab: int
                 ) -> tuple[list[Source], dict[str, _SplitPlan]]:
    """Open and check every source, and decide what each split samples from each."""
    vocab = load_tokenizer(tokenizer_path).vocab_size
    check_vocab(vocab, model_vocab, f"tokenizer {tokenizer_path}")
    datas = [IndexedDataset(p) for p in prefixes]
    for data in datas:
        if data.dtype.kind in "iu" and np.iinfo(data.dtype).max < vocab - 1:
            raise DataError(f"{data.prefix} stores {data.dtype} tokens, too narrow for vocab "
                            f"{vocab}; it was prepared with another tokenizer, re-prepare it")
        if len(data) == 0 or data.num_tokens == 0:
            raise DataError(f"{data.prefix} holds no tokens ({len(data)} documents); prepare "
                            "it again from non-empty inputs or drop it from data.prefixes")
        _check_token_ids(data, cache_folder(data.prefix, cfg.cache_dir), tokenizer_path, vocab,
                         model_vocab)
    ranges = [split_ranges(len(d), cfg.split) for d in datas]
    if cfg.weights is not None:
        weights = check_weights(list(cfg.weights), len(prefixes))
    else:  # no weights: as if the corpora were concatenated
        weights = [float(max(d.num_tokens, 1)) for d in datas]
    total = sum(weights)
    sources = [Source(d.prefix, w / total, len(d), len(d.doc_idx) - 1, d.num_tokens,
                      {s: r[s][1] - r[s][0] for s in SPLITS}) for d, w, r in
               zip(datas, weights, ranges)]

    plans = {}
    for split in SPLITS:
        n = int(num_samples.get(split, 0) or 0)
        present = [i for i, r in enumerate(ranges) if r[split][1] > r[split][0]]
        notes = []
        if n and present and len(present) < len(datas):
            dropped = ", ".join(prefixes[i] for i in range(len(datas)) if i not in present)
            notes.append(f"{split} split blends without {dropped} (no documents in its split)")
        if not n or not present:
            plans[split] = _SplitPlan([], [], None, notes)
            continue
        w = [weights[i] for i in present]
        blend = None
        counts = [n]
        if len(present) > 1:
            blend = blend_indices(w, n)
            counts = np.bincount(blend[0], minlength=len(present)).tolist()
        parts = []
        for i, count in zip(present, counts):
            spec = IndexSpec(prefixes[i], split, ranges[i][split], seq_len, max(int(count), 1),
                             seed, bool(cfg.allow_repeats), cfg.cache_dir)
            spec.check(datas[i])
            parts.append((datas[i], spec))
        plans[split] = _SplitPlan(parts, [x / sum(w) for x in w], blend, notes)
    return sources, plans


__all__ = ["DataBundle", "Source", "build_datasets"]


def unigram_entropy(prefixes: list[str]) -> float:
    """Entropy (nats/token) of the token frequencies over every token of these prepared files: the
    loss of the best model that ignores context, the bar a language model must get well below."""
    counts = [np.bincount(np.memmap(prefix + ".bin", dtype=IndexedDataset(prefix).dtype, mode="r"))
              for prefix in prefixes]
    total = np.zeros(max(len(c) for c in counts))
    for c in counts:
        total[:len(c)] += c
    p = total[total > 0] / total.sum()
    return float(-(p * np.log(p)).sum())

