"""Fixed-length training samples over tokenized documents, with GPT-NeoX/Megatron semantics.

A split is a contiguous range of documents. Its documents are laid end to end, one shuffled
order per epoch, for as many epochs as the requested samples need; sample j is the token
window [j*seq_len, j*seq_len + seq_len + 1) of that stream, so samples may span documents and
consecutive samples share one token (the last input is the next sample's first). Samples are
then shuffled, within blocks of about one epoch, so repeats stay an epoch apart.

Three index arrays describe this and are cached as .npy files:
  doc_idx      the document order over all epochs
  sample_idx   (position in doc_idx, token offset) where each sample starts
  shuffle_idx  the sample order
One rank builds them (temp file + rename, so concurrent runs are safe) while the others wait.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neox.data.cache import cache_folder, check_writable
from neox.data.fsutil import save_npy_atomic
from neox.data.indexed import IndexedDataset
from neox.errors import DataError

SPLITS = ("train", "valid", "test")
INDEX_FORMAT = 2  # bump when the arrays' meaning changes, so stale caches are not reused


def parse_split(split: str) -> list[float]:
    """`"969,30,1"` -> three non-negative weights (missing trailing ones are 0)."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) \
            or sum(weights) <= 0:
        raise DataError(f"malformed split {split!r}; write up to three non-negative "
                        "train,valid,test proportions with a positive sum, e.g. '969,30,1'")
    return weights + [0.0] * (3 - len(weights))


def split_ranges(n_docs: int, split: str) -> dict[str, tuple[int, int]]:
    """Contiguous, non-overlapping document ranges [start, end) per split."""
    w = np.array(parse_split(split))
    bounds = np.round(np.cumsum(w) / w.sum() * n_docs).astype(np.int64)
    bounds[-1] = n_docs
    starts = np.concatenate([[0], bounds[:-1]])
    return {name: (int(s), int(e)) for name, s, e in zip(SPLITS, starts, bounds)}


def _int_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.int32) if max_value < 2**31 else np.dtype(np.int64)


def epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int,
                  allow_repeats: bool, name: str) -> int:
    """Passes over the documents needed for `num_samples` samples; DataError if impossible."""
    if tokens_per_epoch == 0:
        raise DataError(f"{name} has no tokens; prepare more data or change the split")
    epochs = -(-(num_samples * seq_len + 1) // tokens_per_epoch)
    if epochs > 1 and not allow_repeats:
        have = (tokens_per_epoch - 1) // seq_len
        raise DataError(f"{name} gives {have} samples of {seq_len}+1 tokens without repeats but "
                        f"{num_samples} were requested; add data, train fewer steps, or set "
                        "data.allow_repeats=true")
    return epochs


def build_index_arrays(sizes: np.ndarray, documents: np.ndarray, seq_len: int,
                       num_samples: int, seed: int, allow_repeats: bool = True,
                       name: str = "data") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) for `num_samples` samples of seq_len+1 tokens.

    The order is prefix-stable: asking for more samples (a longer run, or a resumed run with more
    steps) extends the sequence without changing its beginning. Each epoch's document order and
    each block's sample order come from their own seeded stream, and samples are laid out for
    whole blocks before the list is cut to `num_samples`.
    """
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    epochs_needed(tokens_per_epoch, seq_len, num_samples, allow_repeats, name)
    block = max(1, tokens_per_epoch // seq_len)  # about one epoch of samples
    laid_out = -(-num_samples // block) * block
    if not allow_repeats:  # never lay out more than one pass holds
        laid_out = min(laid_out, max(num_samples, (tokens_per_epoch - 1) // seq_len))
    epochs = epochs_needed(tokens_per_epoch, seq_len, laid_out, True, name)

    # One independent shuffle of the documents per epoch.
    doc_idx = np.empty(epochs * len(documents), dtype=_int_dtype(int(documents.max())))
    for e in range(epochs):
        rng = np.random.default_rng([seed, 0, e])
        doc_idx[e * len(documents):(e + 1) * len(documents)] = rng.permutation(documents)

    # Sample j starts at token j*seq_len of the stream; find its document and offset.
    stream_sizes = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(stream_sizes)
    starts = np.arange(laid_out, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, starts, side="right")  # skips empty documents too
    offset = starts - (ends[pos] - stream_sizes[pos])
    sample_idx = np.stack([pos, offset], axis=1).astype(
        _int_dtype(max(len(doc_idx), int(offset.max(initial=0)))))

    # Shuffle samples within blocks of one epoch, so repeated documents stay an epoch apart; a
    # block cut short keeps the full block's order restricted to the samples that exist.
    shuffle_idx = np.empty(laid_out, dtype=_int_dtype(laid_out))
    for b, start in enumerate(range(0, laid_out, block)):
        order = start + np.random.default_rng([seed, 1, b]).permutation(block)
        shuffle_idx[start:start + block] = order[order < laid_out][: block]
    return doc_idx, sample_idx, shuffle_idx[:num_samples]


@dataclass(frozen=True)
class IndexSpec:
    """Everything that determines one split's index arrays, and where they are cached."""

    prefix: str
    split: str
    doc_range: tuple[int, int]
    seq_len: int
    num_samples: int
    seed: int
    allow_repeats: bool
    cache_dir: str | None = None

    def files(self, data: IndexedDataset) -> dict[str, Path]:
        # Keyed on the .idx content (not its totals), so a prefix prepared again with the same
        # document and token counts never reuses stale offsets.
        key = hashlib.sha256(repr((
            INDEX_FORMAT, data.identity, self.doc_range, self.seq_len, self.num_samples,
            self.seed, self.allow_repeats)).encode()).hexdigest()[:16]
        folder = cache_folder(self.prefix, self.cache_dir)
        stem = f"{Path(self.prefix).name}_{self.split}_{key}"
        return {k: folder / f"{stem}_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}

    def cached(self, data: IndexedDataset) -> bool:
        return all(f.exists() for f in self.files(data).values())

    @property
    def name(self) -> str:
        return f"{self.prefix} ({self.split} split)"

    def check(self, data: IndexedDataset) -> int:
        """Raise what building would raise, cheaply; every rank calls it before the barrier."""
        tokens = int(data.sizes[self.doc_range[0]:self.doc_range[1]].sum(dtype=np.int64))
        return epochs_needed(tokens, self.seq_len, self.num_samples, self.allow_repeats,
                             self.name)

    def build(self, data: IndexedDataset) -> None:
        """Build and save the arrays unless they are cached (called on the builder rank)."""
        files = self.files(data)
        if self.cached(data):
            return
        arrays = build_index_arrays(data.sizes, np.arange(*self.doc_range), self.seq_len,
                                    self.num_samples, self.seed, self.allow_repeats, self.name)
        try:
            for path, arr in zip(files.values(), arrays):
                save_npy_atomic(path, arr)
        except OSError as e:
            check_writable(path.parent)  # names a file in the way or a read-only folder
            raise DataError(f"cannot write the index cache {path} ({e.strerror}); set "
                            "data.cache_dir to a writable folder with free space") from None

    def load(self, data: IndexedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        files = self.files(data)
        missing = [str(f) for f in files.values() if not f.exists()]
        if missing:
            raise DataError(f"index cache {missing[0]} is missing after the builder rank "
                            "finished; put data.cache_dir on a filesystem all ranks share")
        arrays = []
        for f in files.values():
            try:
                arrays.append(np.load(f, mmap_mode="r"))
            except (OSError, ValueError):  # numpy's message about pickles would mislead
                raise DataError(f"index cache file {f} is not a readable .npy file (damaged?); "
                                "delete it and run again") from None
        return tuple(arrays)  # type: ignore


class GPTDataset:
    """Split of one prepared corpus as fixed-length samples: `ds[i]` is int64[seq_len + 1]."""

    def __init__(self, data: IndexedDataset, spec: IndexSpec) -> None:
        self.data = data
        self.spec = spec
        self.seq_len = spec.seq_len
        self.doc_idx, self.sample_idx, self.shuffle_idx = spec.load(data)
        self.num_docs = spec.doc_range[1] - spec.doc_range[0]
        self.num_tokens = int(data.sizes[spec.doc_range[0]:spec.doc_range[1]].sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        j = int(self.shuffle_idx[i])
        pos, offset = (int(v) for v in self.sample_idx[j])
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        while filled < len(out):
            doc = int(self.doc_idx[pos])
            take = min(int(self.data.sizes[doc]) - offset, len(out) - filled)
            out[filled:filled + take] = self.data.get(doc, offset, take)
            filled += take
            pos, offset = pos + 1, 0
        return out


def blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, sample_index) interleaving datasets in proportion to `weights`.

    Dataset d's k-th sample is placed at time (k + 0.5) / w_d and all samples are taken in
    time order; so every prefix of the blend holds each dataset within one sample of its share.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, which, nth = [], [], []
    for d, wd in enumerate(w):
        k = np.arange(math.ceil(wd * num_samples) + 2, dtype=np.int64)
        times.append((k + 0.5) / wd)
        which.append(np.full(len(k), d, dtype=np.int16))
        nth.append(k)
    order = np.argsort(np.concatenate(times), kind="stable")[:num_samples]
    return np.concatenate(which)[order], np.concatenate(nth)[order]


def check_weights(weights: list[float], n: int) -> list[float]:
    if len(weights) != n:
        raise DataError(f"data.weights has {len(weights)} entries for {n} prefixes; give one "
                        "weight per prefix")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise DataError(f"blend weight {w!r} is not a positive finite number; every "
                            "data.weights entry must be > 0 (drop a source instead of weight 0)")
    return [float(w) for w in weights]


class BlendedDataset:
    """Samples drawn from several datasets in fixed proportions, in a deterministic order."""

    def __init__(self, datasets: list[GPTDataset], dataset_index: np.ndarray,
                 sample_index: np.ndarray, weights: list[float]) -> None:
        self.datasets = datasets
        self.dataset_index = dataset_index
        self.sample_index = sample_index
        self.weights = weights
        self.seq_len = datasets[0].seq_len

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


__all__ = ["parse_split", "split_ranges", "build_index_arrays", "IndexSpec", "GPTDataset",
           "BlendedDataset", "blend_indices", "check_weights"]
