"""A randomized fault campaign against a real training run (what `jobs/chaos.py` runs).

One tiny run on Ray Train is submitted again and again until it finishes; before it
starts, a seeded plan scatters faults over its steps:

- crash: SIGKILL a random worker after a step (Ray Train restarts the worker group
  from the latest checkpoint, within the FailureConfig retry budget);
- preempt: SIGTERM a random worker (the run checkpoints and ends; it is resubmitted,
  as a job controller would);
- corrupt: after a preempted submission, damage the newest checkpoint (resume must
  fall back to the previous good one);
- shrink/grow (with `min_workers`): each resubmission gets a random number of workers in
  [min_workers, workers], as when a job controller restarts on whatever spot capacity is
  left (the checkpoint is resumed through DeepSpeed's universal format).

A fault is *survived* when the run still finished afterwards. Samples lost / repeated
come from the final checkpoint's ledger (platform/fault/ledger.py).
"""
from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from pathlib import Path

from .inject import SignalAtSteps, fired
from .integrity import checkpoints_newest_first
from .ledger import audit_checkpoint


@dataclass
class ChaosReport:
    injected: int
    survived: int
    lost: int
    repeated: int
    finished: bool
    submissions: int
    events: list[str]
    beyond: int = 0  # samples in the final weights past its sample position (ledger.LedgerAudit)

    def line(self) -> str:
        return (f"faults injected {self.injected}, survived {self.survived}, "
                f"samples lost {self.lost}, repeated {self.repeated}"
                + (f", trained past the checkpoint's position {self.beyond}" if self.beyond else ""))


def plan_faults(seed: int, steps: int, crashes: int, preemptions: int, workers: int):
    rng = random.Random(seed)
    chosen = rng.sample(range(1, steps + 1), crashes + preemptions)
    crash = sorted((s, rng.randrange(workers)) for s in chosen[:crashes])
    preempt = sorted((s, rng.randrange(workers)) for s in chosen[crashes:])
    return crash, preempt


def corrupt_newest(run_dir: Path, rng: random.Random) -> str:
    newest = checkpoints_newest_first(run_dir)[0]
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(rng.randrange(1, victim.stat().st_size))
    return f"corrupted {newest.name}/{victim.relative_to(newest)}"


def run_chaos(job_factory, out: Path, seed: int, steps: int, crashes: int, preemptions: int,
              workers: int, log=print, min_workers: int = 0) -> ChaosReport:
    """`job_factory(hooks, max_failures, num_workers)` -> JobSpec of the same run (same
    name/storage). A fault planned for a rank that a smaller submission lacks does not fire."""
    from mamba_slm.platform.train.launcher import run_pretraining

    rng = random.Random(seed + 1)
    crash, preempt = plan_faults(seed, steps, crashes, preemptions, workers)
    log(f"plan (seed {seed}): SIGKILL (step, rank) {crash}; SIGTERM (step, rank) {preempt}")
    markers = out / "faults"
    hooks = ([SignalAtSteps([s], markers / f"kill-r{r}", rank=r, sig=signal.SIGKILL) for s, r in crash]
             + [SignalAtSteps([s], markers / f"term-r{r}", rank=r, sig=signal.SIGTERM) for s, r in preempt])
    events, corruptions, submissions, result = [], 0, 0, None
    for submissions in range(1, preemptions + 2 + 1):
        n = rng.randint(min_workers, workers) if min_workers and submissions > 1 else workers
        job = job_factory(hooks, crashes, n)
        result = run_pretraining(job)
        last = result.last
        events.append(f"submission {submissions} on {n} worker(s): ended at step {last.get('step')} "
                      f"(resumed from {last.get('resumed_from_step')}, preempted: {last.get('preempted') or 'no'})")
        log(events[-1])
        if last.get("step") == steps:  # a notice at the last step still ends with the final checkpoint
            break
        if last.get("preempted") and rng.random() < 0.5:
            events.append(corrupt_newest(Path(result.run_dir), rng))
            corruptions += 1
            log(events[-1])
    finished = bool(result and result.last.get("step") == steps)
    injected = sum(len(fired(d)) for d in markers.glob("*")) + corruptions
    # the final checkpoint: step_N, or step_N-r1 ... had step N been checkpointed before a fallback
    audit = audit_checkpoint(checkpoints_newest_first(result.run_dir)[0]) if finished else None
    return ChaosReport(injected=injected, survived=injected if finished else 0,
                       lost=audit.lost if audit else -1, repeated=audit.repeated if audit else -1,
                       finished=finished, submissions=submissions, events=events,
                       beyond=audit.beyond if audit else 0)
