"""Data: prepare corpora into Megatron-compatible .bin/.idx files and sample them for training.

    indexed    the .bin/.idx format (MMIDIDX v1): writer and memory-mapped reader
    tokenizer  tokenizer.json / trained byte-level BPE / bytes, and the EOD token
    sources    documents from local files, globs and `datasets`
    prepare    the `python -m neox.data.prepare` command
    embedded   the default corpus: this machine's Python stdlib, tokenized once and cached
    sampling   fixed-length samples, splits, cached index arrays, blending
    build      build_datasets(): from a DataConfig to train/valid/test datasets
    loader     make_loader(): resumable, data-parallel batches
"""
from neox.data.build import DataBundle, build_datasets
from neox.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from neox.data.loader import make_loader

__all__ = ["build_datasets", "DataBundle", "make_loader", "IndexedDataset",
           "IndexedDatasetWriter", "best_dtype"]
