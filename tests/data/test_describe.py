"""The data summary counts what the .idx holds: sequences, and documents where they differ."""
from __future__ import annotations

import numpy as np

from neox.data.build import SPLITS, DataBundle, Source
from neox.data.indexed import IndexedDataset


def bundle(source: Source) -> DataBundle:
    return DataBundle(train=None, valid=None, test=None, vocab_size=300, tokenizer_path="t.json", eod_id=0,
                      sources=[source])


def test_sequences_and_documents_are_named_apart_when_they_differ():
    split = dict(zip(SPLITS, (90, 9, 1)))
    same = bundle(Source("a", 1.0, 100, 100, 5000, split)).describe()
    assert "a: 100 documents (90/9/1 train/valid/test)" in same
    differ = bundle(Source("b", 1.0, 100, 40, 5000, split)).describe()
    assert "b: 100 sequences (40 documents) (90/9/1 train/valid/test)" in differ


def test_the_document_count_comes_from_the_index(tmp_path):
    """A GPT-NeoX style .idx (sentence splitting: several sequences per document): 6 sequences in 2."""
    from neox.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(6):
            w.add_document(np.arange(1, 4, dtype=np.uint16))
    idx = (tmp_path / "d.idx").read_bytes()
    n, head = 6, 9 + 8 + 1 + 8  # magic, version, dtype code, sequence count; then the doc index length
    doc_start = head + 8 + 12 * n
    patched = (idx[:head] + np.int64(3).tobytes() + idx[head + 8: doc_start]
               + np.array([0, 3, 6], np.int64).tobytes())
    (tmp_path / "d.idx").write_bytes(patched)
    d = IndexedDataset(str(prefix))
    assert (len(d), len(d.doc_idx) - 1) == (6, 2)
