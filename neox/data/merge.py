"""Concatenate prepared datasets into one `.bin/.idx`, verified: what a sharded preparation ends with, and
`python -m neox.data.shards -o OUT PIECE...` for datasets prepared separately.
"""
from __future__ import annotations

import shutil
from typing import Callable, Sequence

import numpy as np

from neox.data.fsutil import temp_name
from neox.data.indexed import IndexedDataset, paths, write_index
from neox.errors import DataError


# ---------------------------------------------------------------------------------------------
# Merging


def merge(pieces: Sequence[tuple[str, str, str]], output: str,
          sidecars: Callable[[], None] = lambda: None) -> None:
    """Concatenate prepared datasets into `output.bin/.idx`, in order.

    `sidecars` writes the files beside the output once the pieces are checked, before the
    .bin and the .idx appear (so a reader never finds the data without them).

    `pieces` are (prefix, tokenizer id, dtype) in order. Refuses pieces of different tokenizers
    or dtypes; checks every piece's index against its .bin first, and the merged result after.
    """
    first_prefix, first_tok, first_dtype = pieces[0]
    datasets = []
    for prefix, tok, dtype in pieces:
        if tok != first_tok:
            raise DataError(f"{prefix} was prepared with tokenizer {tok} but {first_prefix} with "
                            f"{first_tok}; merge only pieces prepared with the same tokenizer")
        ds = IndexedDataset(prefix)  # checks the .idx against the .bin
        if ds.dtype.name != dtype or ds.dtype.name != first_dtype:
            raise DataError(f"{prefix} holds {ds.dtype.name} tokens but {first_prefix} "
                            f"{first_dtype}; merge only pieces of one dtype (prepare them with "
                            "the same tokenizer)")
        if not np.array_equal(ds.doc_idx, np.arange(len(ds) + 1)):
            raise DataError(f"{prefix} holds several sequences per document (sentence "
                            "splitting); only one-sequence-per-document pieces can be merged")
        datasets.append(ds)
    dtype = datasets[0].dtype
    sizes = np.concatenate([ds.sizes for ds in datasets])
    sidecars()
    bin_path, idx_path = paths(output)
    tmp_bin = temp_name(bin_path)
    try:
        with open(tmp_bin, "wb") as out:
            for ds in datasets:
                with open(paths(ds.prefix)[0], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        # renames the .bin into place, then the .idx: never an index without its data
        write_index(idx_path, dtype, sizes, bin_tmp=tmp_bin, bin_final=bin_path)
    finally:
        tmp_bin.unlink(missing_ok=True)
    _verify(output, datasets, sizes)


def _verify(output: str, datasets: list[IndexedDataset], sizes: np.ndarray) -> None:
    """The merged index describes its .bin (IndexedDataset checks that), holds every piece's
    sizes in order, and each piece's first and last document read back the same."""
    merged = IndexedDataset(output)
    if not np.array_equal(merged.sizes, sizes) or merged.dtype != datasets[0].dtype:
        raise DataError(f"the merged index {output}.idx does not match its pieces; run again")
    first = 0
    for ds in datasets:
        for i in {0, len(ds) - 1} if len(ds) else ():
            if not np.array_equal(merged[first + i], ds[i]):
                raise DataError(f"{output}.bin differs from {ds.prefix}.bin at its document "
                                f"{i} (a disk or copy error?); run again")
        first += len(ds)
