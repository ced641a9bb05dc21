"""Deterministic, resumable reading of the curated shards (format: BRIEF / data issue).

Every training row has a *global sample index* g = 0, 1, 2, ... over the whole run.
Row g is fixed by (seed, g) alone:

    epoch = g // N,  position p = g % N           (N rows in the split)
    blocks (Parquet row groups) are permuted per epoch with a seeded RNG;
    consecutive permuted blocks form windows of `shuffle_window_blocks`;
    rows are permuted inside each window with an RNG seeded by (seed, epoch, window).

Optimizer step s consumes the global batch [s*B, (s+1)*B) (B = global batch size); a
worker of rank r among W takes its contiguous slice of B/W rows and cuts it into
micro-batches. A run therefore only has to remember its *sample position* (the next g),
and a resumed run reads exactly what an uninterrupted one would have read next, with
any number of workers. Reads touch a few row groups per window (cached), never a whole
shard, so the reader scales to shards of any size.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

FORMAT = "mamba-slm-packed-v1"


@dataclass
class Batch:
    """One micro-batch: inputs, aligned targets and document index, all (b, L)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    seq_idx: torch.Tensor
    sample_ids: np.ndarray  # the global sample indices of the rows (for a sample ledger)


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir} has no manifest.json: not a curated data directory (build one with "
            "`python jobs/curate.py`, or leave --data-path empty for the demo corpus)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class PackedSampleReader:
    """Maps global sample indices to rows of one split of a curated data directory."""

    def __init__(self, data_dir: str | Path, split: str = "train", seed: int = 0,
                 window_blocks: int = 8, cache_blocks: int | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"] or not self.manifest["splits"][split]["shards"]:
            raise ValueError(f"{self.data_dir}: manifest has no shards for split {split!r}")
        self.seq_len = int(self.manifest["seq_len"])
        self.seed, self.window_blocks = seed, window_blocks
        self.blocks: list[tuple[str, int, int]] = []  # (shard path, row group, rows)
        for shard in self.manifest["splits"][split]["shards"]:
            path = str(self.data_dir / shard["path"])
            meta = pq.ParquetFile(path).metadata
            self.blocks += [(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        self.block_rows = np.array([b[2] for b in self.blocks], dtype=np.int64)
        self.num_rows = int(self.block_rows.sum())
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_blocks or 2 * window_blocks
        self._layout = lru_cache(maxsize=2)(self._epoch_layout)
        self._window_perm = lru_cache(maxsize=4 * window_blocks)(self._window_permutation)

    def __len__(self) -> int:
        return self.num_rows

    # Index arithmetic ------------------------------------------------------------------
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block order of an epoch, the start row of each permuted block, and the start
        row of each window (both in permuted order, plus a final end entry)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        starts = np.concatenate([[0], np.cumsum(self.block_rows[order])])
        window_starts = starts[:: self.window_blocks]
        if window_starts[-1] != starts[-1]:
            window_starts = np.append(window_starts, starts[-1])
        return order, starts, window_starts

    def _window_permutation(self, epoch: int, window: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, window]).permutation(size)

    def locate(self, g: int) -> tuple[int, int]:
        """Global sample index -> (block index, row within the block)."""
        epoch, p = divmod(int(g), self.num_rows)
        order, starts, wstarts = self._layout(epoch)
        w = int(np.searchsorted(wstarts, p, side="right")) - 1
        lo, hi = int(wstarts[w]), int(wstarts[w + 1])
        q = lo + int(self._window_perm(epoch, w, hi - lo)[p - lo])
        k = int(np.searchsorted(starts, q, side="right")) - 1
        return int(order[k]), q - int(starts[k])

    # Reading ----------------------------------------------------------------------------
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        path, group, rows = self.blocks[b]
        table = pq.ParquetFile(path).read_row_group(group, columns=["input_ids", "doc_ids"])
        width = self.seq_len + 1
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(rows, width)
        docs = table.column("doc_ids").combine_chunks().flatten().to_numpy().reshape(rows, width)
        self._cache[b] = (ids, docs)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ids, docs

    def rows(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, L+1) input_ids and doc_ids of the given global sample indices."""
        width = self.seq_len + 1
        ids = np.empty((len(sample_ids), width), dtype=np.int64)
        docs = np.empty((len(sample_ids), width), dtype=np.int32)
        for i, g in enumerate(sample_ids):
            b, r = self.locate(int(g))
            block_ids, block_docs = self._block(b)
            ids[i], docs[i] = block_ids[r], block_docs[r]
        return ids, docs

    def batch(self, sample_ids: np.ndarray) -> Batch:
        ids, docs = self.rows(sample_ids)
        # Inputs are row[:-1], targets row[1:]; the document of a target is its input's
        # (EOS belongs to the document it ends), so seq_idx comes from docs[:, :-1].
        return Batch(input_ids=torch.from_numpy(ids[:, :-1].copy()),
                     labels=torch.from_numpy(ids[:, 1:].copy()),
                     seq_idx=torch.from_numpy(docs[:, :-1].copy()),
                     sample_ids=np.asarray(sample_ids, dtype=np.int64))


def rank_sample_ids(position: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """Global sample indices that worker `rank` of `world` trains on in the step whose
    global batch starts at `position`: its contiguous slice of the global batch."""
    per_rank = global_batch // world
    start = position + rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


class StepBatches:
    """Micro-batches of this worker for successive steps, read one step ahead in a thread
    (parquet decode overlaps the previous step's compute)."""

    def __init__(self, reader: PackedSampleReader, global_batch: int, micro_batch: int,
                 rank: int, world: int):
        self.reader, self.global_batch, self.micro_batch = reader, global_batch, micro_batch
        self.rank, self.world = rank, world
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data")
        self._pending: tuple[int, Future] | None = None

    def _read(self, position: int) -> list[Batch]:
        ids = rank_sample_ids(position, self.global_batch, self.rank, self.world)
        return [self.reader.batch(ids[i:i + self.micro_batch]) for i in range(0, len(ids), self.micro_batch)]

    def get(self, position: int) -> list[Batch]:
        """Micro-batches of the step starting at `position`; prefetches the next step."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == position:
            batches = pending[1].result()
        else:
            if pending is not None:
                pending[1].result()  # one reader thread at a time: the block cache is not shared-safe
            batches = self._read(position)
        nxt = position + self.global_batch
        self._pending = (nxt, self._pool.submit(self._read, nxt))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
