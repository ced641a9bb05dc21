"""Packing token streams into fixed-length training rows and writing shards.

Documents are concatenated, each followed by EOS, and cut into rows of ``seq_len + 1``
tokens (inputs = row[:-1], targets = row[1:]; the format in the manifest contract).
``doc_ids`` numbers the documents within each row (0, 0, .., 1, 1, ..), so training can
reset Mamba state and mask attention at boundaries; EOS belongs to the document it
ends. A document longer than a row continues in the next row as that row's document 0.
The last partial row of a chunk is dropped (and counted), as GPT-NeoX/Megatron do, so
no row holds padding.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc_ids", pa.list_(pa.int32()))])


def pack_documents(docs: list[np.ndarray], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, L+1) input_ids, (rows, L+1) doc_ids, and the number of tokens dropped."""
    width = seq_len + 1
    if not docs:
        empty = np.zeros((0, width), dtype=np.int32)
        return empty, empty.copy(), 0
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    stream = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for doc, start, end in zip(docs, starts, ends):
        stream[start:end - 1] = doc
        stream[end - 1] = eos_id
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    n_rows = len(stream) // width
    dropped = len(stream) - n_rows * width
    ids = stream[: n_rows * width].reshape(n_rows, width)
    global_doc = doc_index[: n_rows * width].reshape(n_rows, width)
    doc_ids = (global_doc - global_doc[:, :1]).astype(np.int32)  # renumber from 0 per row
    return ids, doc_ids, dropped


def write_shard(path: Path, ids: np.ndarray, doc_ids: np.ndarray) -> dict:
    """Write one Parquet shard; returns its manifest entry (without the final path)."""
    width = ids.shape[1]
    offsets = pa.array(np.arange(0, ids.size + 1, width, dtype=np.int32))
    table = pa.Table.from_arrays(
        [pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))),
         pa.ListArray.from_arrays(offsets, pa.array(doc_ids.reshape(-1)))], schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=1024)
    return {"rows": int(ids.shape[0]), "tokens": int(ids.size), "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
