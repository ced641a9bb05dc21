"""Per-step hooks: the loop calls `hook.on_step_end(state, rank)` on every worker after
each optimizer step, before deciding whether to checkpoint or stop. A hook may set
`state.checkpoint_requested` / `state.stop_requested` (a preemption notice does) or
raise (fault injection). Hooks travel to the workers pickled, so keep them small."""
from __future__ import annotations

from pathlib import Path

from .state import TrainState


class FailAtStep:
    """Fault injection: worker `rank` raises after step `step`, once per marker file
    (the marker survives the restart, so the resumed attempt carries on)."""

    def __init__(self, step: int, marker: str | Path, rank: int = 0):
        self.step, self.marker, self.rank = step, str(marker), rank

    def on_step_end(self, state: TrainState, rank: int) -> None:
        if rank == self.rank and state.step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed at step {self.step}\n")
            raise RuntimeError(f"injected failure after step {self.step} on rank {rank}")
