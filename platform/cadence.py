"""Checkpoint cadence under preemptions: the Young/Daly interval and what it costs.

A run that checkpoints every `tau` seconds of work, where one checkpoint takes `delta`
seconds to write and failures (spot preemptions) arrive as a Poisson process with mean
time between failures `M`, spends its wall time on three things besides useful work:

- writing checkpoints: `delta / tau` of the time (the write blocks training);
- redoing lost work: a failure lands on average halfway through a segment of
  `tau + delta` seconds, so each failure throws away `(tau + delta) / 2` seconds;
- restarting: `R` seconds per failure to get a node back, start the pods and load the
  latest checkpoint.

Young (1974) minimised the first two terms to first order: `tau = sqrt(2 * delta * M)`.
Daly (2006, "A higher order estimate of the optimum checkpoint interval for restart
dumps", FGCS 22(3)) gives the higher-order optimum used here:

    tau = sqrt(2 delta M) * (1 + sqrt(delta / (2M)) / 3 + (delta / (2M)) / 9) - delta
          for delta < 2M, else tau = M.

The waste fractions below are the first-order model (per unit of wall time); they are
accurate while the total waste stays well under ~30%, which is the regime where
checkpointing on spot capacity makes sense at all. `wall_time_factor` converts compute
time into expected wall time: `wall = compute / (1 - waste)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def young_interval(checkpoint_write_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum, seconds of work between checkpoints."""
    _check_positive(checkpoint_write_s=checkpoint_write_s, mtbf_s=mtbf_s)
    return math.sqrt(2.0 * checkpoint_write_s * mtbf_s)


def daly_interval(checkpoint_write_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum, seconds of work between checkpoints."""
    _check_positive(checkpoint_write_s=checkpoint_write_s, mtbf_s=mtbf_s)
    if checkpoint_write_s >= 2.0 * mtbf_s:
        return mtbf_s
    ratio = checkpoint_write_s / (2.0 * mtbf_s)
    return (math.sqrt(2.0 * checkpoint_write_s * mtbf_s)
            * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - checkpoint_write_s)


@dataclass(frozen=True)
class CheckpointCadence:
    """The chosen interval and the expected fractions of wall time it costs."""

    interval_s: float            # seconds of training between checkpoints
    checkpoint_write_s: float    # measured (or estimated) time to write one checkpoint
    mtbf_s: float                # mean time between failures of the whole job
    restart_s: float             # time from a failure to training again
    checkpoint_fraction: float   # wall time spent writing checkpoints
    rework_fraction: float       # wall time spent redoing work lost to failures
    restart_fraction: float      # wall time spent restarting after failures

    @property
    def waste_fraction(self) -> float:
        return self.checkpoint_fraction + self.rework_fraction + self.restart_fraction

    @property
    def wall_time_factor(self) -> float:
        """Expected wall time per unit of failure-free compute time (>= 1)."""
        return 1.0 / (1.0 - self.waste_fraction)

    def describe(self) -> str:
        return (f"checkpoint every {self.interval_s / 60:.1f} min "
                f"(write {self.checkpoint_write_s:.0f} s, job MTBF {self.mtbf_s / 3600:.1f} h): "
                f"{self.checkpoint_fraction:.1%} writing, {self.rework_fraction:.1%} rework, "
                f"{self.restart_fraction:.1%} restarts")


def plan_cadence(checkpoint_write_s: float, mtbf_s: float, restart_s: float = 0.0,
                 interval_s: float | None = None) -> CheckpointCadence:
    """Cadence at the Daly optimum (or at a given `interval_s`) and its waste fractions.

    Raises ValueError when failures are so frequent that no progress is expected (the
    waste reaches 100%): then the run needs faster checkpoints or steadier capacity.
    """
    _check_positive(checkpoint_write_s=checkpoint_write_s, mtbf_s=mtbf_s)
    if restart_s < 0:
        raise ValueError(f"restart_s={restart_s} must be >= 0")
    tau = daly_interval(checkpoint_write_s, mtbf_s) if interval_s is None else interval_s
    if tau <= 0:
        raise ValueError(f"interval_s={tau} must be > 0")
    cadence = CheckpointCadence(
        interval_s=tau,
        checkpoint_write_s=checkpoint_write_s,
        mtbf_s=mtbf_s,
        restart_s=restart_s,
        checkpoint_fraction=checkpoint_write_s / tau,
        rework_fraction=(tau + checkpoint_write_s) / 2.0 / mtbf_s,
        restart_fraction=restart_s / mtbf_s,
    )
    if cadence.waste_fraction >= 1.0:
        raise ValueError(
            f"expected waste {cadence.waste_fraction:.0%} >= 100%: a failure every "
            f"{mtbf_s:.0f} s with {checkpoint_write_s:.0f} s checkpoints and {restart_s:.0f} s "
            "restarts leaves no progress; write checkpoints faster or use steadier capacity")
    return cadence


def job_mtbf_s(preemptions_per_node_hour: float, nodes: int) -> float:
    """MTBF of a job on `nodes` nodes that each fail independently at the given rate.

    Any node's preemption interrupts the job (the elastic trainer restarts the worker
    group from the latest checkpoint), so the job's failure rate is the sum.
    """
    _check_positive(preemptions_per_node_hour=preemptions_per_node_hour)
    if nodes < 1:
        raise ValueError(f"nodes={nodes} must be >= 1")
    return 3600.0 / (preemptions_per_node_hour * nodes)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{name}={value} must be a positive finite number")
