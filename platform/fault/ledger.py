"""The sample ledger: which global sample indices a checkpoint's weights were trained on.

Each worker records the indices of the rows it actually fed to the model (from
`Batch.sample_ids`, not recomputed), as half-open intervals. At a checkpoint the
workers' intervals are gathered on rank 0 and added to the ledger inherited from the
checkpoint the run resumed from; the result is `ledger.json` inside the checkpoint. Work
done after the last checkpoint and lost in a failure never reaches a ledger, exactly as
it never reaches the weights, so for an intact run the ledger of step s covers
[0, sample_position) once: `audit` counts the samples lost (never trained), repeated
(trained twice) and beyond the position (trained into the weights, yet the data loader
resuming at sample_position would feed them again) to prove it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LEDGER_FILE = "ledger.json"


def to_intervals(ids: np.ndarray) -> list[list[int]]:
    """Runs of consecutive indices as [start, end), sorted; a repeated index starts a new run."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        return []
    breaks = np.nonzero(np.diff(ids) != 1)[0] + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(ids, breaks)]


def merge_adjacent(intervals: list[list[int]]) -> list[list[int]]:
    """Join touching intervals; overlapping ones stay separate so repeats remain visible."""
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out


@dataclass
class LedgerAudit:
    expected: int   # samples in [0, sample_position)
    trained: int    # total samples in the ledger, counting repeats
    lost: int       # in [0, sample_position) but never trained
    repeated: int   # trained more than once (each extra time counts)
    beyond: int = 0  # trained, at or past sample_position: a resume would train them again

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.repeated == 0 and self.beyond == 0


@dataclass
class SampleLedger:
    intervals: list[list[int]] = field(default_factory=list)

    def add(self, sample_ids: np.ndarray) -> None:
        self.intervals = merge_adjacent(self.intervals + to_intervals(sample_ids))

    def extend(self, intervals: list[list[int]]) -> None:
        self.intervals = merge_adjacent(self.intervals + [list(i) for i in intervals])

    def audit(self, sample_position: int) -> LedgerAudit:
        trained = sum(b - a for a, b in self.intervals)
        repeated, reach = 0, 0  # sweep: the part of an interval below `reach` was seen before
        for a, b in sorted(self.intervals):
            repeated += max(0, min(b, reach) - a)
            reach = max(reach, b)
        union = merge_union(self.intervals)
        in_range = sum(max(0, min(b, sample_position) - a) for a, b in union)
        beyond = sum(max(0, b - max(a, sample_position)) for a, b in union)
        return LedgerAudit(expected=sample_position, trained=trained,
                           lost=sample_position - in_range, repeated=repeated, beyond=beyond)

    def save(self, checkpoint_dir: str | Path, sample_position: int) -> None:
        (Path(checkpoint_dir) / LEDGER_FILE).write_text(
            json.dumps({"sample_position": sample_position, "intervals": self.intervals}))

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "SampleLedger":
        path = Path(checkpoint_dir) / LEDGER_FILE
        if not path.is_file():
            return cls()
        return cls(json.loads(path.read_text())["intervals"])


def merge_union(intervals: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def audit_checkpoint(checkpoint_dir: str | Path) -> LedgerAudit:
    """Audit the ledger of a checkpoint against its own sample position."""
    d = json.loads((Path(checkpoint_dir) / LEDGER_FILE).read_text())
    return SampleLedger(d["intervals"]).audit(d["sample_position"])
