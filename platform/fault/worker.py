"""What the training loop calls, on every worker, to survive preemptions.

`WorkerFaultTolerance` ties the parts together at three points of a step:

- `record(batches)`: the sample ids of the micro-batches just trained (the ledger);
- `after_step(state, step_time, report_wanted)`: one tiny all-reduce (MAX) of [notice seen,
  step time, report wanted] so every worker agrees, at the same step, to checkpoint and
  stop when any of them got a preemption notice (a checkpoint is collective: one worker
  alone would hang the rest), and on when to call `ray.train.report` (the same number
  of calls on every worker);
- `seal(path, state)` when a checkpoint is written: the ledger, then the manifests.

Cadence: `checkpoint_every` steps, or with "auto" the Young/Daly interval
(platform/cadence.py) from the measured checkpoint write time and the configured
preemption rate, converted to steps with the measured step time. The first checkpoint
of an auto run is written after step 1 to measure the write time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from mamba_slm.platform.cadence import CheckpointCadence, job_mtbf_s, plan_cadence

from .integrity import seal_checkpoint
from .ledger import SampleLedger
from .preemption import AWS_METADATA, GCP_METADATA, PreemptionWatcher, build_notices

log = logging.getLogger(__name__)


class AutoCadence:
    """Young/Daly checkpoint interval in steps, re-planned after every checkpoint."""

    def __init__(self, preemptions_per_node_hour: float, nodes: int, restart_s: float = 0.0):
        self.mtbf_s = job_mtbf_s(preemptions_per_node_hour, nodes)
        self.restart_s = restart_s
        self.write_s: list[float] = []
        self.step_s: list[float] = []
        self.interval_steps: int | None = None
        self.plan: CheckpointCadence | None = None

    def observe_step(self, seconds: float) -> None:
        self.step_s = (self.step_s + [seconds])[-50:]

    def observe_write(self, seconds: float) -> str:
        self.write_s = (self.write_s + [seconds])[-5:]
        write = sum(self.write_s) / len(self.write_s)
        step = sorted(self.step_s)[len(self.step_s) // 2] if self.step_s else 1.0  # median
        self.plan = plan_cadence(max(write, 1e-3), self.mtbf_s, self.restart_s)
        self.interval_steps = max(1, round(self.plan.interval_s / max(step, 1e-6)))
        return (f"checkpoint cadence (Young/Daly): every {self.interval_steps} steps = "
                f"{self.plan.describe()}, step {step:.2f} s")

    def due(self, steps_since_checkpoint: int) -> bool:
        if self.interval_steps is None:
            return True  # measure the write time once
        return steps_since_checkpoint >= self.interval_steps


class Agreed(NamedTuple):
    stop: bool
    report: bool


class WorkerFaultTolerance:
    def __init__(self, training, run, rank: int, world: int, resume_dir: Path | None,
                 message=None):
        self.rank, self.world = rank, world
        self.every = training.checkpoint_every
        self.message = message or log.warning
        self.ledger = SampleLedger.load(resume_dir) if resume_dir is not None and rank == 0 else SampleLedger()
        self.new_samples = SampleLedger()
        self.auto = (AutoCadence(run.preemptions_per_hour, max(1, world)) if self.every == "auto" else None)
        self.last_checkpoint_step = None
        self.preempted = ""
        self.step_time, self.warned_grace = 0.0, False
        notices = build_notices(run.preemption_notices, run.aws_metadata_url or AWS_METADATA,
                                run.gcp_metadata_url or GCP_METADATA)
        self.watcher = PreemptionWatcher(notices, grace_s=run.preemption_grace_s,
                                         poll_every_s=run.notice_poll_s).start()

    def record(self, batches) -> None:
        for b in batches:
            self.new_samples.add(b.sample_ids)

    def after_step(self, state, step_time: float, report_wanted: bool = False) -> Agreed:
        """Collective: what every worker does after this step. `stop`: checkpoint now and
        stop (a notice anywhere); `report`: some worker wants a report to Ray now."""
        if self.last_checkpoint_step is None:
            self.last_checkpoint_step = state.resumed_from_step or 0
        flags = all_reduce_max([1.0 if self.watcher.check() else 0.0, step_time, float(report_wanted)])
        self.step_time = flags[1]
        if self.auto is not None:
            self.auto.observe_step(flags[1])
        if flags[0] > 0 and not self.preempted:
            self.preempted = self.watcher.reason or "a preemption notice on another worker"
            state.checkpoint_requested = True
        return Agreed(stop=bool(self.preempted), report=flags[2] > 0)

    def checkpoint_due(self, step: int) -> bool:
        if self.auto is not None:
            return self.auto.due(step - self.last_checkpoint_step)
        return bool(self.every) and step % self.every == 0

    def seal(self, path: Path, state) -> None:
        """Collective: gather the ledger to rank 0, write it, then every rank's manifest."""
        parts = [self.new_samples.intervals]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.new_samples.intervals)
        if self.rank == 0:
            for p in parts:
                self.ledger.extend(p)
            self.ledger.save(path, state.sample_position)
        self.new_samples = SampleLedger()
        seal_checkpoint(path, self.rank, self.world, state.step)

    def checkpoint_written(self, step: int, seconds: float) -> None:
        """Collective: the slowest writer's time decides, on every rank. Warns once when a
        step plus a checkpoint write takes longer than the preemption grace period (a
        notice would then end in a torn checkpoint and the run would resume from the one
        before, losing the steps since)."""
        self.last_checkpoint_step = step
        slowest = all_reduce_max([seconds])[0]
        grace = self.watcher.grace_s
        if self.rank == 0 and not self.warned_grace and self.step_time + slowest > grace:
            self.warned_grace = True
            self.message(f"checkpoint write took {slowest:.1f} s (+ a {self.step_time:.1f} s step), longer than "
                         f"the preemption grace period of {grace:.0f} s: a preemption notice would not "
                         "leave time to checkpoint, and the run would resume from the checkpoint before. "
                         "Raise --preemption-grace-s (and the pod's terminationGracePeriodSeconds) or "
                         "use storage that writes faster.")
        if self.auto is None:
            return
        line = self.auto.observe_write(slowest)
        if self.rank == 0:
            self.message(line)

    def close(self) -> None:
        self.watcher.stop()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over the workers (identity without a process group). The tensor
    lives where the backend reduces: NCCL takes only CUDA tensors, gloo only CPU ones."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every worker (identity without a process group). Under NCCL the
    pickled object travels through the current CUDA device, set by the training loop."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
