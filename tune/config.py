"""Typed configuration of a sweep (`SweepConfig`): the proxy, the data, the step budget
and its rungs, the searcher and scheduler, and what each trial may use of the cluster.
Saved as `<sweep dir>/sweep.json`, which is all `--resume` needs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamba_slm.model.config import PRESETS

from .space import SearchSpace

SEARCHERS = ("random", "optuna")
PROXIES = {"10M": "proxy-10M", "50M": "proxy-50M", "150M": "proxy-150M", "tiny": "tiny"}
SWEEP_FILE = "sweep.json"


def proxy_preset(name: str) -> str:
    """`50M`, `proxy-50M` and `tiny` all name a preset; anything else is an error."""
    preset = PROXIES.get(name, name)
    if preset not in PRESETS:
        raise ValueError(f"--proxy {name!r}: choose one of {sorted(PROXIES)} (or a model preset "
                         f"{sorted(PRESETS)})")
    return preset


@dataclass
class SweepConfig:
    name: str
    output_dir: str                   # the sweep directory (Tune's experiment directory)
    data_path: str
    proxy: str = "proxy-50M"
    trials: int = 32
    steps: int = 200                  # optimizer steps of a trial that is never stopped early
    rungs: int = 4                    # validation points per trial (ASHA decides at these)
    global_batch_size: int = 32
    micro_batch_size: int = 8
    eval_batches: int = 20            # validation batches (of micro_batch_size rows) per rung
    searcher: str = "random"
    asha: bool = True
    reduction_factor: int = 3
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 0        # 0 = train inside the trial's process; N = N Ray Train workers
    max_concurrent: int = 0           # 0 = as many as the cluster's resources allow
    wandb: bool = True
    wandb_project: str = "mamba-slm-sweeps"
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        self.proxy = proxy_preset(self.proxy)
        for name in ("trials", "steps", "rungs", "global_batch_size", "micro_batch_size",
                     "eval_batches", "reduction_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SweepConfig.{name}={value!r}: must be a positive integer")
        if self.rungs > self.steps:
            raise ValueError(f"SweepConfig.rungs={self.rungs} exceeds steps={self.steps}")
        if self.searcher not in SEARCHERS:
            raise ValueError(f"SweepConfig.searcher={self.searcher!r}: expected one of {SEARCHERS}")
        if self.cpus_per_trial <= 0:
            raise ValueError(f"SweepConfig.cpus_per_trial={self.cpus_per_trial}: must be > 0 (a "
                             "fraction such as 0.5 packs trials)")
        if self.gpus_per_trial < 0 or self.workers_per_trial < 0 or self.max_concurrent < 0:
            raise ValueError("SweepConfig.gpus_per_trial, workers_per_trial and max_concurrent must be >= 0")
        if self.workers_per_trial and 0 < self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError("a trial with Ray Train workers uses whole GPUs per worker: "
                             "--gpus-per-trial must be 0 or 1 with --workers-per-trial")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"SweepConfig.global_batch_size={self.global_batch_size} is not a "
                             f"multiple of micro_batch_size={self.micro_batch_size}")
        if isinstance(self.space, dict):
            self.space = SearchSpace.from_dict(self.space)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_trial > 0

    def rung_steps(self) -> list[int]:
        """Cumulative steps at which a trial is validated: `rungs` equal segments."""
        return sorted({max(1, round(self.steps * (i + 1) / self.rungs)) for i in range(self.rungs)})

    def trial_dir(self, trial_id: str) -> Path:
        """Where trial `trial_id` trains (its checkpoints, metrics and final model)."""
        return Path(self.output_dir) / "trials" / trial_id

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SweepConfig got unknown fields {unknown}")
        return cls(**d)

    def save(self) -> Path:
        path = Path(self.output_dir) / SWEEP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, sweep_dir: str | Path) -> "SweepConfig":
        path = Path(sweep_dir) / SWEEP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {sweep_dir} is not a sweep directory "
                                    "(start a sweep without --resume first)")
        return cls.from_dict(json.loads(path.read_text()))
