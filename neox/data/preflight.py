"""Check, before any worker starts, everything about the data that a worker would reject at start.

The launcher calls `preflight` from its plan (so `dry_run=true` fails on it too); it runs the same
checks the workers run in `build_datasets`, from the same code, minus building anything:
prefixes and blend weights, one tokenizer across a blend, the tokenizer and the data against the
model's vocab (the largest token id is read once per data version and cached), the split, the
samples the run needs, and where the index cache will be written.
"""
from __future__ import annotations

from typing import Any

from neox.data.build import check_vocab, plan_sources, resolve_prepared
from neox.data.cache import cache_folder, check_writable
from neox.data.embedded import cache_root
from neox.errors import DataError


def preflight(data_cfg: Any, *, seq_len: int, model_vocab: int,
              num_samples: dict[str, int] | None = None, seed: int = 0) -> list[str]:
    """Raise DataError on the first problem a worker would hit; return warnings to show.

    `model_vocab` is the model's padded vocab; `num_samples` (per split) and `seed` are what the
    workers will ask for: with them the sample counts and the index cache are checked too.
    """
    num_samples = num_samples or {}
    if data_cfg.kind == "embedded":
        vocab = int(data_cfg.embedded_vocab)
        if vocab < 257:
            raise DataError(f"data.embedded_vocab={vocab} is below 257 (256 bytes + EOD); "
                            "raise it (default 8192)")
        check_vocab(vocab, model_vocab, "the embedded corpus BPE (data.embedded_vocab)")
        # Built by the workers (or cached) from this machine's stdlib, by us: only cheap checks
        # here, since even finding the cached copy walks the stdlib.
        check_writable(cache_root() / "embedded", setting="NEOX_CACHE")
        return []
    if data_cfg.kind != "prepared":
        raise DataError(f"unknown data.kind {data_cfg.kind!r}; use 'embedded' or 'prepared'")

    prefixes, tokenizer, warnings = resolve_prepared(data_cfg)

    for prefix in prefixes:  # a file in the way fails even when nothing needs writing
        check_writable(cache_folder(prefix, data_cfg.cache_dir), must_write=False)
    _, splits = plan_sources(data_cfg, prefixes, tokenizer, seq_len, num_samples, seed,
                             model_vocab)
    for split in splits.values():
        warnings += split.notes
        for data, spec in split.parts:
            if not spec.cached(data):
                check_writable(cache_folder(spec.prefix, spec.cache_dir))
    return warnings


__all__ = ["preflight"]
