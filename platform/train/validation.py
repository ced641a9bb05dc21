"""Held-out loss during pretraining (`--eval-every N`): every N steps and at the last one,
the loss on the data's `val` split, logged beside the training loss (console, metrics.jsonl,
wandb, loss_curve.png).

The same loss as the training step (the chunked cross-entropy through the DeepSpeed
engine, so ZeRO-3 gathers its weights as in training; no gradients), on the same rows at
every evaluation: the first `eval_batches` global batches of the split, each worker its
slice of each, in micro-batches as in training. The set depends on the global batch only,
so an elastic run that shrinks or grows evaluates the same rows (which rows: the split in
the seed's shuffled order). A collective: every worker calls `evaluate` on the same steps
(ZeRO-3's forward gathers across them). A preemption notice during an evaluation ends it
after the current global batch (the workers agree on it), so the checkpoint the notice asks
for is not kept waiting by the rest of the evaluation."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from mamba_slm.platform.fault.worker import all_reduce_max

from .data import Batch, PackedSampleReader, rank_sample_ids

SPLIT = "val"


def validation_batches(reader: PackedSampleReader, global_batch: int, wanted: int) -> int:
    """Global batches an evaluation runs: `wanted`, or as many as the split holds."""
    available = len(reader) // global_batch
    if available == 0:
        raise ValueError(f"{reader.data_dir}: the {SPLIT!r} split has {len(reader)} rows, fewer than one "
                         f"global batch ({global_batch}); curate more validation data or turn the "
                         "evaluation off (--eval-every 0)")
    return min(wanted, available)


class Validator:
    def __init__(self, data_path: str, cfg, rank: int, world: int):
        self.reader = PackedSampleReader(data_path, SPLIT, cfg.seed)
        self.global_batch, self.micro_batch = cfg.global_batch_size, cfg.micro_batch_size
        self.batches = validation_batches(self.reader, self.global_batch, cfg.eval_batches)
        self.rank, self.world = rank, world

    def evaluate(self, engine, interrupted=lambda: False) -> dict[str, float] | None:
        """-> `held_out_metrics` of the val rows, the same on every worker; None when
        `interrupted()` (this worker's preemption notice) turned true on any worker."""
        def global_batches():  # read as they are evaluated
            for b in range(self.batches):
                ids = rank_sample_ids(b * self.global_batch, self.global_batch, self.rank, self.world)
                yield [self.reader.batch(ids[i:i + self.micro_batch]) for i in range(0, len(ids), self.micro_batch)]

        return held_out_metrics(engine, global_batches(), self.world, interrupted)


@torch.no_grad()
def held_out_metrics(engine, groups, world: int, interrupted=None) -> dict[str, float] | None:
    """The training loss per target token (labels -100 left out) over every worker's
    `groups` of micro-batches (`Batch`es), no gradients, the engine put back in its mode:
    {"val_loss", "val_ppl", "val_tokens", "val_time_s"}, the same on every worker. A
    collective: the workers pass equally many groups (ZeRO-3's forward gathers across them);
    with `interrupted`, they agree before each group whether to stop, and then get None."""
    started = time.perf_counter()
    was_training = engine.training
    engine.eval()
    dev = engine.device
    total = torch.zeros(2, dtype=torch.float64, device=dev)  # loss sum, tokens
    try:
        for group in groups:
            if interrupted is not None and all_reduce_max([1.0 if interrupted() else 0.0])[0] > 0:
                return None
            for mb in group:
                mb: Batch
                out = engine(mb.input_ids.to(dev), seq_idx=mb.seq_idx.to(dev), labels=mb.labels.to(dev),
                             return_logits=False)
                n = (mb.labels != -100).sum().to(dev, torch.float64)
                total += torch.stack([out.loss.double() * n, n])
    finally:
        engine.train(was_training)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(total)
    loss = (total[0] / total[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1].item()),
            "val_time_s": time.perf_counter() - started}


def validation_due(step: int, cfg, stopping_early: bool) -> bool:
    """Every `eval_every` steps and at the last step; not at a step where the run stops
    early (a preemption notice: its grace period is for the checkpoint; too many bad steps)."""
    if not cfg.eval_every or stopping_early:
        return False
    return step % cfg.eval_every == 0 or step >= cfg.max_steps
