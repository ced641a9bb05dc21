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


class KillNodeAtStep:
    """The worker on Ray node `node_id` kills that node's raylet with SIGKILL after
    `step` (once, across restarts): every process of the node dies with it, as when a
    spot VM is reclaimed without notice. Ray workers are children of their raylet."""

    def __init__(self, step: int, node_id: str, marker_dir: str | Path):
        self.step, self.node_id, self.marker_dir = step, node_id, str(marker_dir)

    def on_step_end(self, state, rank: int) -> None:
        import psutil
        import ray

        if state.step != self.step or ray.get_runtime_context().get_node_id() != self.node_id:
            return
        marker = Path(self.marker_dir) / f"node-killed-step{state.step}"
        if marker.exists():
            return
        raylet = psutil.Process(os.getppid())
        if "raylet" not in " ".join(raylet.cmdline()):
            raise RuntimeError(f"parent of worker {os.getpid()} is not a raylet: {raylet.cmdline()}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"raylet {raylet.pid}, worker rank {rank}\n")
        raylet.kill()
        os.kill(os.getpid(), signal.SIGKILL)


class PaceWhileSmall:
    """Sleep `seconds` after each step while the run has fewer than `workers` workers:
    keeps a shrunken run going long enough for its lost node to come back (tests)."""

    def __init__(self, workers: int, seconds: float):
        self.workers, self.seconds = workers, seconds

    def on_step_end(self, state, rank: int) -> None:
        import time

        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if world < self.workers:
            time.sleep(self.seconds)
