"""Fixtures of the fault-tolerance tests: the small learnable dataset of the training
tests, and one uninterrupted 2-worker run that every faulted run must reproduce."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.launcher import resolve_job, run_pretraining
from mamba_slm.platform.train.metrics import read_metrics
from mamba_slm.platform.train.synthetic import write_synthetic_dataset

STEPS, BATCH = 8, 8


def run_tiny(data, out, name, hooks=(), **run_fields):
    """The fault tests' run: tiny preset, 2 CPU workers, ZeRO-2, a checkpoint every 2 steps,
    seed 11. `run_fields` override RunConfig (max_failures, min_workers, ...)."""
    t = TrainingConfig(max_steps=STEPS, global_batch_size=BATCH, micro_batch_size=2, warmup_steps=2,
                       lr=3e-3, checkpoint_every=2, zero_stage=2, seed=11)
    run = RunConfig(**{"name": name, "num_workers": 2, "output_dir": str(out / name),
                       "storage_path": str(out / "storage"), "wandb": False, "plot": False, **run_fields})
    return run_pretraining(resolve_job(t, DataConfig(path=str(data)), run, hooks=list(hooks)))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """512 train rows of 65 tokens (seq_len 64), vocab 256, 2 shards of 64-row groups."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", seq_len=64,
                                   vocab_size=256, train_rows=512, val_rows=32, shards=2, row_group=64)


@pytest.fixture(scope="session")
def fault_run():
    """`run_tiny`, for the test modules."""
    return run_tiny


@pytest.fixture(scope="session")
def baseline_run(ray_cluster, synthetic_data, tmp_path_factory):
    """Output directory of the uninterrupted run (model/, metrics.jsonl)."""
    out = tmp_path_factory.mktemp("baseline")
    # Restarts (a loaded CI machine) resume bit-identically, as test_worker_faults proves.
    run_tiny(synthetic_data, out, "uninterrupted", max_failures=2)
    return out / "uninterrupted"


@pytest.fixture(scope="session")
def baseline(baseline_run):
    """Final weights of the uninterrupted run."""
    return load_file(str(baseline_run / "model" / "model.safetensors"))


@pytest.fixture(scope="session")
def baseline_losses(baseline_run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(baseline_run)}
