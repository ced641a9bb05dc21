"""What a training run is (`JobSpec`) and where it stands (`TrainState`).

`JobSpec` is everything a worker needs, as plain data: the three typed configs, the
resolved model config (vocabulary from the data manifest), resolved absolute paths and
the per-step hooks. `TrainState` is everything that changes step to step and goes into
a checkpoint besides the engine's tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mamba_slm.model import ModelConfig

from .config import DataConfig, RunConfig, TrainingConfig, check_run_fits


@dataclass
class JobSpec:
    training: TrainingConfig
    data: DataConfig
    run: RunConfig
    model: ModelConfig
    hooks: list = field(default_factory=list)  # objects with on_step_end(state, rank)

    def __post_init__(self) -> None:
        check_run_fits(self.training, self.run)

    def to_dict(self) -> dict[str, Any]:
        """The full config stored in every checkpoint (hooks are run-time only)."""
        return {"training": self.training.to_dict(), "data": self.data.to_dict(),
                "run": self.run.to_dict(), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], hooks: list | None = None) -> "JobSpec":
        return cls(TrainingConfig.from_dict(d["training"]), DataConfig.from_dict(d["data"]),
                   RunConfig.from_dict(d["run"]), ModelConfig.from_dict(d["model"]), hooks or [])


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps attempted (skipped ones included)
    sample_position: int = 0      # global index of the next sample to train on
    tokens_seen: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    loss_ema: float | None = None  # running mean of good losses, for the spike test
    resumed_from_step: int | None = None
    stop_reason: str = ""
    # Set by hooks (e.g. a preemption notice): save a checkpoint now / stop after it.
    checkpoint_requested: bool = False
    stop_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for transient in ("checkpoint_requested", "stop_requested", "resumed_from_step"):
            d.pop(transient)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
