"""Learning-rate schedules as pure functions of the step.

The training loop sets the learning rate of every parameter group before each optimizer
step (as nanoGPT does), so the scheduler's whole state is the step number, which the
checkpoint already holds: a resumed run continues the schedule exactly.

- cosine: linear warmup to the peak, then half a cosine down to `min_lr_ratio * lr`
  at the last update, step `max_steps - 1` (or `schedule_steps - 1` when set)
  (Loshchilov & Hutter 2017; the GPT-3 recipe).
- wsd (warmup-stable-decay): linear warmup, constant peak, then a linear decay to the
  minimum over the last `decay_fraction` of the steps (MiniCPM, Hu et al. 2024, sec. 4).
  The stable phase can be extended and decayed from any checkpoint.
"""
from __future__ import annotations

import math

from .config import TrainingConfig


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update is step 0)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    horizon = cfg.schedule_steps or cfg.max_steps  # a staged run keeps one schedule
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        # from the peak at the first step after the warmup to the floor at the last
        # update, step horizon - 1 (steps are 0-based)
        span = max(1, horizon - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    decay_start = cfg.wsd_decay_start()
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / (horizon - decay_start))
    return peak + (floor - peak) * progress
