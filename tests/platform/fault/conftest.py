"""Fixtures of the fault-tolerance tests: the uninterrupted 2-worker ZeRO-2 run (shared
with tests/platform/train, ../conftest.py) that every faulted run must reproduce."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from mamba_slm.platform.train.metrics import read_metrics


@pytest.fixture(scope="session")
def baseline_run(uninterrupted):
    """Output directory of the uninterrupted run (model/, metrics.jsonl)."""
    return uninterrupted(zero_stage=2)


@pytest.fixture(scope="session")
def baseline(baseline_run):
    """Final weights of the uninterrupted run."""
    return load_file(str(baseline_run / "model" / "model.safetensors"))


@pytest.fixture(scope="session")
def baseline_losses(baseline_run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(baseline_run)}
