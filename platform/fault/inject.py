"""Fault injection for tests and `jobs/chaos.py`: real signals to real processes.

Like `platform.train.hooks.FailAtStep`, each fault fires once: a marker file records
that it happened, and the file survives the restart, so the resumed attempt goes on."""
from __future__ import annotations

import os
import signal
from pathlib import Path


class SignalAtSteps:
    """Worker `rank` sends itself `sig` (SIGKILL: a crash with no cleanup; SIGTERM: a
    preemption notice) after each of `steps`, once per step across restarts."""

    def __init__(self, steps, marker_dir: str | Path, rank: int = 0, sig: int = signal.SIGKILL):
        self.steps, self.marker_dir, self.rank, self.sig = sorted(set(steps)), str(marker_dir), rank, int(sig)

    def on_step_end(self, state, rank: int) -> None:
        if rank != self.rank or state.step not in self.steps:
            return
        marker = Path(self.marker_dir) / f"{signal.Signals(self.sig).name}-step{state.step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"pid {os.getpid()}\n")
        os.kill(os.getpid(), self.sig)


def fired(marker_dir: str | Path) -> list[str]:
    d = Path(marker_dir)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
