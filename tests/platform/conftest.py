"""Fixtures of the training and fault-tolerance tests: the small learnable dataset, the
tiny 2-worker run they all vary, and that run uninterrupted, trained once per session for
every test that must reproduce it."""
from __future__ import annotations

import pytest

from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.launcher import resolve_job, run_pretraining
from mamba_slm.platform.train.synthetic import write_synthetic_dataset

STEPS, BATCH = 8, 8


def run_tiny(data, out, name, hooks=(), zero_stage: int = 2, **run_fields):
    """The tests' run: tiny preset, 2 CPU workers, ZeRO-2 (or `zero_stage`), a checkpoint
    every 2 steps, the val loss every 4, seed 11. `run_fields` override RunConfig
    (max_failures, min_workers, use_gpu, ...)."""
    t = TrainingConfig(max_steps=STEPS, global_batch_size=BATCH, micro_batch_size=2, warmup_steps=2,
                       lr=3e-3, checkpoint_every=2, eval_every=4, eval_batches=2, zero_stage=zero_stage, seed=11)
    run = RunConfig(**{"name": name, "num_workers": 2, "output_dir": str(out / name),
                       "storage_path": str(out / "storage"), "wandb": False, "plot": False, **run_fields})
    return run_pretraining(resolve_job(t, DataConfig(path=str(data)), run, hooks=list(hooks)))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """512 train rows of 65 tokens (seq_len 64), vocab 256, 2 shards of 64-row groups."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", seq_len=64,
                                   vocab_size=256, train_rows=512, val_rows=32, shards=2, row_group=64)


@pytest.fixture(scope="session")
def tiny_run():
    """`run_tiny`, for the test modules."""
    return run_tiny


@pytest.fixture(scope="session")
def uninterrupted(ray_cluster, synthetic_data, tmp_path_factory):
    """uninterrupted(zero_stage=2, use_gpu=False) -> output directory (model/,
    metrics.jsonl) of `run_tiny` with no fault, run once per session for each setting."""
    runs = {}

    def get(zero_stage: int = 2, use_gpu: bool = False):
        if (zero_stage, use_gpu) not in runs:
            out = tmp_path_factory.mktemp("uninterrupted")
            name = f"uninterrupted-z{zero_stage}{'-gpu' if use_gpu else ''}"
            # Restarts (a loaded CI machine) resume bit-identically, as test_worker_faults proves.
            run_tiny(synthetic_data, out, name, zero_stage=zero_stage, use_gpu=use_gpu, max_failures=2)
            runs[zero_stage, use_gpu] = out / name
        return runs[zero_stage, use_gpu]
    return get
