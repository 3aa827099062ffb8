"""Progress of a preparation run: input bytes with an ETA, tokens/s, skipped documents, a summary.

The bar counts input bytes (known for local files, so tqdm can show an ETA); where the total is
unknown (a `datasets` source) it counts documents. The summary line says what went in and out,
how fast, and which documents were skipped and why.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass
class Counts:
    """What a run (or one shard of it) read and wrote; the readers (neox.data.sources, pieces) count
    files, documents and skips into it as they go, the writer adds tokens."""

    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    skipped_invalid_utf8: int = 0
    skipped_empty_files: int = 0
    files: int = 0

    def add(self, other: "Counts") -> None:
        for key in vars(self):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def skipped(self) -> str:
        """`none`, or each reason with its count."""
        why = [_count(self.skipped_invalid_utf8, "document of invalid UTF-8",
                      "documents of invalid UTF-8"),
               _count(self.skipped_empty_files, "empty file", "empty files")]
        return ", ".join(w for w in why if w) or "none"


def _count(n: int, one: str, many: str) -> str:
    return "" if n == 0 else f"1 {one}" if n == 1 else f"{n} {many}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


class Progress:
    """A tqdm bar over input bytes (or documents), updated by the writer as batches land."""

    def __init__(self, total_bytes: int | None, enabled: bool, what: str = "") -> None:
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        self.total_bytes = total_bytes
        self.counts = Counts()
        self.bar = tqdm(total=total_bytes, unit="B" if total_bytes else " docs", unit_scale=True,
                        unit_divisor=1000, desc=what or None, file=sys.stderr, mininterval=0.5,
                        disable=not enabled, dynamic_ncols=True)

    def update(self, counts: Counts) -> None:
        """Set the totals so far (they only grow)."""
        step = (counts.bytes_read - self.counts.bytes_read if self.total_bytes
                else counts.documents - self.counts.documents)
        self.counts = Counts(**vars(counts))
        rate = counts.tokens / max(time.perf_counter() - self.t0, 1e-9)
        skipped = counts.skipped_invalid_utf8 + counts.skipped_empty_files
        self.bar.set_postfix_str(f"{rate / 1e6:.2f} M tok/s, {counts.documents} docs"
                                 + (f", {skipped} skipped" if skipped else ""), refresh=False)
        self.bar.update(step)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self, encoder: str) -> str:
        """One line: bytes and tokens in, rates, documents, what was skipped and why."""
        c, s = self.counts, max(time.perf_counter() - self.t0, 1e-9)
        read = f"read {_mb(c.bytes_read)} ({_mb(c.bytes_read / s)}/s), " if c.bytes_read else ""
        return (f"{read}{c.documents} docs, {c.tokens / 1e6:.2f} M tokens in {s:.1f} s "
                f"({c.tokens / s / 1e6:.2f} M tok/s, encoder {encoder}); skipped: {c.skipped()}")
