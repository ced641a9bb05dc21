"""Per-chunk work of each curation stage (run inside Ray Data tasks).

Each function takes one chunk spec (see ``sources.plan_chunks``) and the plan, streams
through it with bounded memory, writes that chunk's file under ``<output>/_work`` and
returns JSON-able statistics. ``pipeline.py`` drives them and merges the statistics.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mamba_slm.platform.data import dedup, pack
from mamba_slm.platform.data.plan import CurationPlan
from mamba_slm.platform.data.quality import QUALITY_PROFILES, normalize, quality_reason
from mamba_slm.platform.data.sources import read_item

CLEAN_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("source", pa.int16()), ("text", pa.string())])
KEYS_SCHEMA = pa.schema([("bucket", pa.int32()), ("kind", pa.int8()), ("key", pa.int64()), ("doc_id", pa.int64())])
SAMPLE_SCHEMA = pa.schema([("doc_id", pa.int64()), ("text", pa.string())])
# key: the document's content hash (dedup.content_hash of its clean text), which picks its split
TOKENS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("source", pa.int16()), ("key", pa.int64()),
                           ("ids", pa.list_(pa.int32()))])
FLUSH_DOCS = 256


def unit_hash(doc_id: np.ndarray, salt) -> np.ndarray:
    """Deterministic uniform [0, 1) per doc id (splitmix64), for sampling and splits."""
    x = doc_id.astype(np.uint64) + np.asarray(salt, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def work_file(output: Path, stage: str, chunk: int) -> Path:
    return output / "_work" / stage / f"chunk-{chunk:05d}.parquet"


def clean_chunk(spec: dict, plan: CurationPlan, output: Path, n_buckets: int, sample_rate: float) -> dict:
    """Read -> normalize -> quality filter -> write kept text. Also writes this chunk's
    dedup keys (the map side of the dedup shuffle) and its tokenizer-training sample."""
    chunk = spec["chunk"]
    path = work_file(output, "clean", chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in plan.sources]
    reasons: dict[str, Counter] = defaultdict(Counter)
    bytes_in, chars_kept = Counter(), Counter()
    rows: dict[str, list] = {f: [] for f in CLEAN_SCHEMA.names}
    doc_ids, keys, sample = [], [], {"doc_id": [], "text": []}
    with pq.ParquetWriter(path, CLEAN_SCHEMA, compression="zstd") as writer:
        for s_idx, f_idx, item in spec["items"]:
            profile = QUALITY_PROFILES[plan.sources[s_idx].quality]
            for doc in read_item(plan, s_idx, f_idx, item):
                src = names[doc.source]
                bytes_in[src] += doc.raw_bytes
                reason = doc.reason
                if doc.text is not None:
                    text = normalize(doc.text)
                    reason = quality_reason(text, profile)
                reasons[src][reason or "kept"] += 1
                if reason is not None:
                    continue
                chars_kept[src] += len(text)
                for column, value in (("doc_id", doc.doc_id), ("source", doc.source), ("text", text)):
                    rows[column].append(value)
                doc_ids.append(doc.doc_id)
                keys.append([dedup.content_hash(text), *dedup.minhash_bands(text, plan.dedup).tolist()])
                if unit_hash(np.array([doc.doc_id]), salt=1)[0] < sample_rate:
                    sample["doc_id"].append(doc.doc_id)
                    sample["text"].append(text)
                if len(rows["doc_id"]) >= FLUSH_DOCS:
                    writer.write_table(pa.table(rows, schema=CLEAN_SCHEMA))
                    rows = {f: [] for f in CLEAN_SCHEMA.names}
        if rows["doc_id"]:
            writer.write_table(pa.table(rows, schema=CLEAN_SCHEMA))
    keys_arr = np.array(keys, dtype=np.int64).reshape(len(keys), plan.dedup.bands + 1)
    write_keys(work_file(output, "keys", chunk), np.array(doc_ids, dtype=np.int64), keys_arr, n_buckets)
    pq.write_table(pa.table(sample, schema=SAMPLE_SCHEMA), work_file(output, "sample", chunk))
    return {"chunk": chunk, "reasons": {k: dict(v) for k, v in reasons.items()},
            "bytes_in": dict(bytes_in), "chars_kept": dict(chars_kept)}


def write_keys(path: Path, doc_id: np.ndarray, keys: np.ndarray, n_buckets: int) -> None:
    """(docs, 1 + bands) keys -> rows (bucket, kind, key, doc_id) sorted by bucket, one
    row group per bucket, so a reduce task reads only its own bucket's row groups."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = np.tile(np.array([dedup.KIND_EXACT] + [dedup.KIND_NEAR] * (keys.shape[1] - 1), np.int8), len(keys))
    key, doc = keys.reshape(-1), np.repeat(doc_id, keys.shape[1])
    bucket = (key.astype(np.uint64) % np.uint64(n_buckets)).astype(np.int32)
    order = np.argsort(bucket, kind="stable")
    table = pa.table({"bucket": bucket[order], "kind": kind[order], "key": key[order], "doc_id": doc[order]},
                     schema=KEYS_SCHEMA)
    bounds = np.flatnonzero(np.diff(bucket[order], prepend=-1)).tolist() + [len(table)]
    with pq.ParquetWriter(path, KEYS_SCHEMA) as writer:
        for start, end in zip(bounds[:-1], bounds[1:]):
            writer.write_table(table.slice(start, end - start))
        if len(table) == 0:
            writer.write_table(table)


def bucket_edges(spec: dict, output: Path) -> dict:
    """Reduce side of the dedup shuffle: one bucket's keys from every chunk -> edges."""
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in (output / "_work" / "keys").glob("chunk-*.parquet"))
    table = pads.dataset(files, format="parquet", schema=KEYS_SCHEMA).to_table(
        filter=pads.field("bucket") == spec["chunk"])
    found = dedup.duplicate_edges(table["kind"].to_numpy(), table["key"].to_numpy(), table["doc_id"].to_numpy())
    return {"chunk": spec["chunk"], **{k: v.tolist() for k, v in found.items()}}


def val_hash(keys: np.ndarray, plan: CurationPlan) -> np.ndarray:
    """Uniform [0, 1) per document from its content key: the split follows the content, not
    the document's position in the file list, so a rerun with more (or renamed) files keeps
    every earlier val document in val."""
    return unit_hash(keys, salt=3 + plan.seed)


def tokenize_chunk(spec: dict, output: Path, removed: np.ndarray, names: list[str], plan: CurationPlan) -> dict:
    """Surviving documents -> token ids (no EOS yet) -> write; token counts per source."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(output / "tokenizer.json"))
    # "<|endoftext|>" written in a document is text, not the end of it: only pack_chunk's
    # EOS (one per document) may end one.
    tok.encode_special_tokens = True
    src_file = pq.ParquetFile(work_file(output, "clean", spec["chunk"]))
    path = work_file(output, "tokens", spec["chunk"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, docs, chars = Counter(), Counter(), Counter()
    val_docs, min_u = 0, 1.0  # for the driver's val threshold (pipeline.val_threshold)
    with pq.ParquetWriter(path, TOKENS_SCHEMA, compression="zstd") as writer:
        for batch in src_file.iter_batches(batch_size=FLUSH_DOCS, columns=["doc_id", "source", "text"]):
            doc_id = batch["doc_id"].to_numpy()
            keep = ~np.isin(doc_id, removed)
            texts = [t for t, k in zip(batch["text"].to_pylist(), keep) if k]
            if not texts:
                continue
            encoded = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts, add_special_tokens=False)]
            sources = batch["source"].to_numpy()[keep]
            for s, ids, text in zip(sources, encoded, texts):
                tokens[names[s]] += len(ids)
                docs[names[s]] += 1
                chars[names[s]] += len(text)
            offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int32)
            flat = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
            keys = np.fromiter((dedup.content_hash(t) for t in texts), dtype=np.int64, count=len(texts))
            u = val_hash(keys, plan)
            val_docs, min_u = val_docs + int((u < plan.val_fraction).sum()), min(min_u, float(u.min()))
            writer.write_table(pa.table({
                "doc_id": doc_id[keep], "source": sources, "key": keys,
                "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))},
                schema=TOKENS_SCHEMA))
    return {"chunk": spec["chunk"], "tokens": dict(tokens), "docs": dict(docs), "chars": dict(chars),
            "val_docs": val_docs, "min_u": min_u}


def pack_chunk(spec: dict, plan: CurationPlan, output: Path, ratios: list[float], eos_id: int,
               val_threshold: float) -> dict:
    """Mix (each doc gets floor(r) or ceil(r) copies, r = its source's ratio), split
    train/val by document, order copies by a hash (spreads sources and repeats), pack,
    and write this chunk's train and val shards."""
    table = pq.read_table(work_file(output, "tokens", spec["chunk"]))
    doc_id, source = table["doc_id"].to_numpy(), table["source"].to_numpy()
    ratio = np.asarray(ratios, dtype=np.float64)[source]
    copies = np.floor(ratio).astype(np.int64) + (unit_hash(doc_id, salt=2 + plan.seed) < ratio % 1.0)
    is_val = val_hash(table["key"].to_numpy(), plan) < val_threshold
    names = [s.name for s in plan.sources]
    result = {"chunk": spec["chunk"], "selected_tokens": Counter(), "shards": {}, "dropped_tokens": 0}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        picked = np.flatnonzero(mask)
        rows = np.repeat(picked, copies[picked])
        copy_index = np.arange(len(rows)) - np.repeat(np.cumsum(copies[picked]) - copies[picked], copies[picked])
        order = np.argsort(unit_hash(doc_id[rows], salt=4 + plan.seed + 7919 * copy_index), kind="stable")
        docs = [table["ids"][int(r)].values.to_numpy() for r in rows[order]]
        for r, d in zip(rows[order], docs):
            result["selected_tokens"][names[source[r]]] += len(d) + 1   # + EOS
        ids, doc_ids, dropped = pack.pack_documents(docs, eos_id, plan.seq_len)
        result["dropped_tokens"] += dropped
        if len(ids):
            tmp = output / split / f".chunk-{spec['chunk']:05d}.parquet"
            result["shards"][split] = {"tmp": str(tmp), **pack.write_shard(tmp, ids, doc_ids)}
    result["selected_tokens"] = dict(result["selected_tokens"])
    return result
