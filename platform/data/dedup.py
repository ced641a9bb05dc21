"""Exact and near-duplicate detection (MinHash LSH) that scales with Ray Data.

Per document (in the streaming clean stage): a 64-bit content hash of the normalized
text, and ``bands`` LSH band hashes of a MinHash signature over word shingles
(Broder 1997; bands/rows banding as in Leskovec et al., "Mining of Massive Datasets",
ch. 3; FineWeb's 14x8 on 5-grams).

Across documents (``find_duplicates``): every (key, doc_id) pair, where a key is a
content hash or a band hash, is hash-partitioned by key with Ray Data's shuffle, and
each partition finds runs of equal keys with a numpy sort. Only the duplicate *edges*
come back to the driver (as in datatrove's MinhashDedupCluster stage); connected
components over them pick one survivor per cluster, the smallest doc_id (earliest
source in the plan). Memory on the driver is O(duplicates), not O(documents).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from mamba_slm.platform.data.plan import DedupConfig

_WORD = re.compile(r"\w+")
KIND_EXACT, KIND_NEAR = 0, 1


def content_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _stable_word_hashes(words: list[str]) -> np.ndarray:
    """Process-independent 61-bit hashes (Python's hash() is salted per process)."""
    index: dict[str, int] = {}  # not a fixed-width numpy string array: see quality._word_id_array
    inverse = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.int64, count=len(words))
    table = np.fromiter(
        (int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") & ((1 << 61) - 1)
         for w in index), dtype=np.uint64, count=len(index))
    return table[inverse]


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-shift hashing (Dietzfelbinger et al. 1997): h(x) = ((a*x + b) mod 2**64)
    >> 32 with random 64-bit a (odd) and b is a universal family on 32-bit x. A small-a
    linear hash mod a prime is NOT: a*x barely wraps, so every "permutation" keeps the
    smallest shingle and unrelated documents collide."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.bands * cfg.rows
    a = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    return a, b


def minhash_bands(text: str, cfg: DedupConfig) -> np.ndarray:
    """(bands,) uint64 band hashes; the band index is mixed in so bands never collide.
    Shingles are ``shingle_words`` lowercase words (FineWeb normalizes case too)."""
    words = _WORD.findall(text.lower())
    if not words:
        words = [text]
    w = _stable_word_hashes(words)
    n = cfg.shingle_words
    if len(w) >= n:
        shingles = np.zeros(len(w) - n + 1, dtype=np.uint64)
        for k in range(n):  # polynomial hash of n word hashes, wrapping mod 2**64
            shingles = shingles * np.uint64(1_000_003) + w[k: len(w) - n + 1 + k]
    else:
        shingles = w
    shingles = np.unique(shingles) >> np.uint64(32)   # 32-bit shingle ids
    a, b = _permutations(cfg)
    sig = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(shingles), 4096):  # bounded temporaries for long docs
        block = shingles[start:start + 4096, None]
        sig = np.minimum(sig, ((a[None, :] * block + b[None, :]) >> np.uint64(32)).min(axis=0))
    bands = sig.reshape(cfg.bands, cfg.rows)
    h = np.arange(1, cfg.bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for r in range(cfg.rows):
        h = h * np.uint64(1_000_003) + bands[:, r]
    return h >> np.uint64(1)   # fits int64 columns


def duplicate_edges(kind: np.ndarray, key: np.ndarray, doc_id: np.ndarray) -> dict[str, np.ndarray]:
    """Within one hash partition: for every run of equal (kind, key) with more than one
    document, an edge from the run's smallest doc_id to each other member."""
    order = np.lexsort((doc_id, key, kind))
    kind, key, doc_id = kind[order], key[order], doc_id[order]
    if len(key) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return {"kind": empty.astype(np.int8), "root": empty, "member": empty}
    new_run = np.ones(len(key), dtype=bool)
    new_run[1:] = (key[1:] != key[:-1]) | (kind[1:] != kind[:-1])
    run_start = np.flatnonzero(new_run)
    run_of = np.cumsum(new_run) - 1
    members = ~new_run  # every row that is not the first (smallest id) of its run
    return {"kind": kind[members].astype(np.int8),
            "root": doc_id[run_start[run_of[members]]].astype(np.int64),
            "member": doc_id[members].astype(np.int64)}


def connected_components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and the smallest node of their component, by min-label propagation with
    pointer jumping (numpy, no per-edge Python)."""
    nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
    a, b = inv[: len(u)], inv[len(u):]
    label = np.arange(len(nodes))   # nodes are sorted, so index order == doc_id order
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        while not np.array_equal(new, new[new]):
            new = new[new]
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def removal_from_edges(kind: np.ndarray, root: np.ndarray, member: np.ndarray) -> dict[str, np.ndarray]:
    """Doc ids to drop (sorted) with their reason: ``duplicate_exact`` when the text is
    identical to another document's, else ``duplicate_near``."""
    if len(root) == 0:
        return {"doc_id": np.zeros(0, dtype=np.int64), "exact": np.zeros(0, dtype=bool)}
    nodes, comp_root = connected_components(root, member)
    removed = nodes[nodes != comp_root]
    exact_members = np.unique(member[kind == KIND_EXACT])
    return {"doc_id": removed, "exact": np.isin(removed, exact_members)}
