"""Held-out perplexity on a curated split (the `mamba-slm-packed-v1` format written by
jobs/curate.py): the same rows and document boundaries the model trains on.

Usable inside a training loop (pass the live module or a DeepSpeed engine; it is put
back in train mode afterwards) and from `jobs/evaluate.py --perplexity <data dir>`.
Under torch.distributed every rank evaluates every `world_size`-th row and the sums are
all-reduced, so every rank returns the same numbers (all ranks must call it). A ZeRO-3
model's forward is itself a collective (it gathers the partitioned weights), so there the
ranks step together: one whose rows ran out runs a throwaway forward while others finish.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mamba_slm.platform.fault.worker import all_reduce_max

FORMAT = "mamba-slm-packed-v1"


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} has no manifest.json: not a curated data directory "
                                f"(build one with jobs/curate.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_vocabulary(data_dir: str | Path, vocab_size: int, tokenizer=None, model_name: str = "the model") -> None:
    """Refuse data tokenized for another model: its manifest's vocab_size must be the
    model's, and where `tokenizer` (a `tokenizers.Tokenizer`) is given and the data dir
    holds its own tokenizer, both must map the same strings to the same ids (two BPEs
    trained on different text can have the same size and still disagree on every id,
    which gives meaningless numbers rather than an error). Raises ValueError naming both."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    data_vocab = manifest.get("vocab_size")
    if data_vocab != vocab_size:
        raise ValueError(f"{data_dir} was tokenized with a {data_vocab}-token vocabulary but {model_name} "
                         f"has {vocab_size} tokens: evaluate on data curated with the model's tokenizer")
    tok_file = data_dir / str(manifest.get("tokenizer") or "tokenizer.json")
    if tokenizer is not None and tok_file.is_file():
        from tokenizers import Tokenizer

        data_vocab_map = Tokenizer.from_file(str(tok_file)).get_vocab()
        if data_vocab_map != tokenizer.get_vocab():
            differ = sum(data_vocab_map.get(t) != i for t, i in tokenizer.get_vocab().items())
            raise ValueError(f"{data_dir} was tokenized with {tok_file}, which is not {model_name}'s tokenizer "
                             f"(same size {vocab_size}, but {differ} tokens have other ids): evaluate on data "
                             f"curated with the model's tokenizer")


def iter_rows(data_dir: str | Path, split: str, batch_size: int, rank: int = 0,
              world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (input_ids, doc_ids), each (B, L+1) int64, over this rank's rows of a split."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
    ids, docs, row = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        table = pq.read_table(data_dir / shard["path"], columns=["input_ids", "doc_ids"])
        for batch in table.to_batches():
            width = len(batch.column(0)[0]) if batch.num_rows else 0
            tok = batch.column(0).flatten().to_numpy().reshape(-1, width)
            doc = batch.column(1).flatten().to_numpy().reshape(-1, width)
            for t, d in zip(tok, doc):
                if row % world_size == rank:
                    ids.append(t)
                    docs.append(d)
                    if len(ids) == batch_size:
                        yield np.stack(ids).astype(np.int64), np.stack(docs).astype(np.int64)
                        ids, docs = [], []
                row += 1
    if ids:
        yield np.stack(ids).astype(np.int64), np.stack(docs).astype(np.int64)


def _unwrap(model):
    return getattr(model, "module", model)  # DeepSpeed engine / DDP -> the HybridLM


@torch.no_grad()
def perplexity(model, data_dir: str | Path, split: str = "val", max_batches: int | None = None,
               batch_size: int = 8, device: str | torch.device | None = None,
               autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean next-token cross-entropy over the split's rows (all L targets of each row,
    documents reset through `seq_idx` as in training), over the real vocabulary (padding
    logits excluded). Returns {"loss", "ppl", "tokens", "rows"}."""
    net = _unwrap(model)
    vocab = net.config.vocab_size
    data_vocab = read_manifest(data_dir).get("vocab_size")
    if isinstance(data_vocab, int) and data_vocab > vocab:  # its ids would index past the logits
        raise ValueError(f"{data_dir} was tokenized with a {data_vocab}-token vocabulary but the model has "
                         f"only {vocab} tokens: evaluate on data curated with the model's tokenizer")
    if device is None:  # a DeepSpeed engine knows its device (parameters may be offloaded)
        device = getattr(model, "device", None) or next(net.parameters()).device
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    lockstep = world > 1 and any(hasattr(p, "ds_id") for p in net.parameters())  # ZeRO-3
    was_training = net.training
    net.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, rows
    rows_iter = iter_rows(data_dir, split, batch_size, rank, world)
    try:
        for i in itertools.count():
            batch = next(rows_iter, None) if max_batches is None or i < max_batches else None
            if lockstep and all_reduce_max([float(batch is not None)])[0] > 0:
                if batch is None:  # out of rows while others are not: join their weight gathers
                    net(torch.zeros(1, 2, dtype=torch.long, device=device))
                    continue
            if batch is None:
                break
            ids, docs = batch
            ids_t = torch.from_numpy(ids).to(device)
            seq_idx = torch.from_numpy(docs[:, :-1]).to(device=device, dtype=torch.int32)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = net(ids_t[:, :-1], seq_idx=seq_idx).logits[..., :vocab]
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids_t[:, 1:].flatten(), reduction="sum")
            total += torch.tensor([loss.item(), ids_t[:, 1:].numel(), ids.shape[0]],
                                  dtype=torch.float64, device=device)
    finally:
        net.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    loss_sum, tokens, rows = total.tolist()
    if tokens == 0:
        raise ValueError(f"split {split!r} of {data_dir} has no rows to evaluate")
    mean = loss_sum / tokens
    return {"loss": mean, "ppl": math.exp(mean), "tokens": int(tokens), "rows": int(rows)}
