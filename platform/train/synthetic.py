"""A small curated-format dataset that needs no corpus: for tests and GPU benchmarks.

Documents are walks of a seeded random Markov chain in which every token has only a few
possible successors, so a model can learn it (the loss falls from ln(V) towards
ln(successors)) and a broken training loop shows. The output follows the curated data
contract exactly (manifest.json, tokenizer.json, train/ and val/ Parquet shards with
input_ids and doc_ids of length seq_len + 1), so training reads it through the same path
as real data.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .data import FORMAT

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc_ids", pa.list_(pa.int32()))])


def _documents(rng: np.random.Generator, n_tokens: int, vocab: int, successors: int,
               eos_id: int) -> list[np.ndarray]:
    table = rng.integers(1, vocab, size=(vocab, successors))  # token -> allowed next tokens
    docs, total = [], 0
    while total < n_tokens:
        length = int(rng.integers(8, 160))
        walk = np.empty(length, dtype=np.int32)
        walk[0] = rng.integers(1, vocab)
        choices = rng.integers(0, successors, size=length)
        for i in range(1, length):
            walk[i] = table[walk[i - 1], choices[i]]
        docs.append(walk)
        total += length + 1
    assert eos_id == 0
    return docs


def _pack(docs: list[np.ndarray], seq_len: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    stream = np.concatenate([np.append(d, eos_id) for d in docs]).astype(np.int32)
    doc_of = np.concatenate([np.full(len(d) + 1, i) for i, d in enumerate(docs)])
    width = seq_len + 1
    n = len(stream) // width
    ids = stream[: n * width].reshape(n, width)
    doc = doc_of[: n * width].reshape(n, width)
    return ids, (doc - doc[:, :1]).astype(np.int32)


def _write_shard(path: Path, ids: np.ndarray, docs: np.ndarray, row_group: int) -> dict:
    width = ids.shape[1]
    offsets = pa.array(np.arange(0, ids.size + 1, width, dtype=np.int32))
    table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))),
                                  pa.ListArray.from_arrays(offsets, pa.array(docs.reshape(-1)))],
                                 schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return {"rows": int(ids.shape[0]), "tokens": int(ids.size),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _word_level_tokenizer(vocab: int, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = {"<eos>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))


def write_synthetic_dataset(path: str | Path, seq_len: int = 64, vocab_size: int = 256,
                            train_rows: int = 512, val_rows: int = 32, shards: int = 2,
                            row_group: int = 64, successors: int = 4, seed: int = 0) -> Path:
    """Write a learnable dataset in the curated format; returns its directory."""
    out = Path(path)
    rng = np.random.default_rng(seed)
    need = (train_rows + val_rows + 1) * (seq_len + 1)
    ids, docs = _pack(_documents(rng, need, vocab_size, successors, eos_id=0), seq_len, eos_id=0)
    splits = {}
    for split, lo, hi, n_shards in (("train", 0, train_rows, shards), ("val", train_rows, train_rows + val_rows, 1)):
        bounds = np.linspace(lo, hi, n_shards + 1).astype(int)
        entries = []
        for i in range(n_shards):
            rel = f"{split}/shard-{i:05d}.parquet"
            entry = _write_shard(out / rel, ids[bounds[i]:bounds[i + 1]], docs[bounds[i]:bounds[i + 1]], row_group)
            entries.append({"path": rel, **entry})
        splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries)}
    _word_level_tokenizer(vocab_size, out / "tokenizer.json")
    manifest = {"format": FORMAT, "seq_len": seq_len, "vocab_size": vocab_size, "eos_id": 0,
                "tokenizer": "tokenizer.json", "splits": splits,
                "plan": {"name": "synthetic-markov", "successors": successors, "seed": seed}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
