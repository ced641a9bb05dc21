"""Checkpoint integrity and the sample ledger: units, then test 4 of issue 5 on a real
(in-process) training run: a corrupt newest checkpoint is skipped with a warning and
the run resumes from the previous good one."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mamba_slm.platform.fault.integrity import (CorruptCheckpointWarning, latest_good_checkpoint,
                                                prune_checkpoints, publish_atomically, seal_checkpoint,
                                                temporary_dir_for, verify_checkpoint)
from mamba_slm.platform.fault.ledger import SampleLedger, audit_checkpoint, to_intervals
from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.launcher import resolve_job, run_pretraining


def _fake_checkpoint(run_dir, step, world=1):
    final = run_dir / f"step_{step:08d}"
    tmp = temporary_dir_for(final)
    for rank in range(world):
        (tmp / "ds").mkdir(parents=True, exist_ok=True)
        (tmp / "ds" / f"shard{rank}.pt").write_bytes(os.urandom(1000))
        seal_checkpoint(tmp, rank, world, step)
    return publish_atomically(tmp, final)


def test_manifest_detects_torn_and_corrupt_checkpoints(tmp_path):
    good = _fake_checkpoint(tmp_path, 1, world=2)
    assert verify_checkpoint(good) == ""
    truncated = _fake_checkpoint(tmp_path, 2, world=2)
    with open(truncated / "ds" / "shard1.pt", "r+b") as f:
        f.truncate(500)
    assert "500 bytes" in verify_checkpoint(truncated)
    flipped = _fake_checkpoint(tmp_path, 3)
    data = bytearray((flipped / "ds" / "shard0.pt").read_bytes())
    data[10] ^= 0xFF
    (flipped / "ds" / "shard0.pt").write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(flipped)
    torn = _fake_checkpoint(tmp_path, 4, world=2)
    (torn / "integrity_rank1.json").unlink()  # rank 1 died before sealing
    assert "torn" in verify_checkpoint(torn)
    assert not list(tmp_path.glob(".tmp-*")), "temporary directories left behind"
    with pytest.warns(CorruptCheckpointWarning) as caught:
        assert latest_good_checkpoint(tmp_path) == good
    assert len(caught) == 3  # steps 4, 3, 2 skipped, each with its reason


def test_keep_last_k_never_drops_the_newest_good_checkpoint(tmp_path):
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    for step in (4, 5):  # the two newest are damaged
        (tmp_path / f"step_{step:08d}" / "integrity_rank0.json").unlink()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]


def test_ledger_counts_lost_and_repeated_samples():
    ledger = SampleLedger()
    for step in range(4):
        ledger.add(np.arange(step * 8, step * 8 + 4))      # rank 0's half
        ledger.add(np.arange(step * 8 + 4, step * 8 + 8))  # rank 1's half
    assert ledger.intervals == [[0, 32]]
    assert ledger.audit(32).exact
    ledger.add(np.arange(24, 28))  # step 3 trained again after a lost checkpoint
    audit = ledger.audit(40)       # and [32, 40) never trained
    assert (audit.repeated, audit.lost, audit.trained) == (4, 8, 36)
    assert to_intervals(np.array([5, 3, 4, 9])) == [[3, 6], [9, 10]]


def _job(data, out, name, max_steps, **training):
    t = TrainingConfig(max_steps=max_steps, global_batch_size=8, micro_batch_size=4, warmup_steps=2,
                       lr=3e-3, checkpoint_every=2, seed=5, **training)
    run = RunConfig(name=name, num_workers=0, output_dir=str(out / name), storage_path=str(out / "storage"),
                    wandb=False, plot=False, keep_checkpoints=3)
    return resolve_job(t, DataConfig(path=str(data)), run)


def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(synthetic_data, tmp_path):
    run_dir = tmp_path / "storage" / "fallback"
    run_pretraining(_job(synthetic_data, tmp_path, "fallback", 6))
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list(run_dir.glob(".tmp-*"))
    newest = run_dir / "step_00000006"
    assert verify_checkpoint(newest) == "" and audit_checkpoint(newest).exact
    shard = max((newest / "ds").rglob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:  # a torn copy: the optimizer shard cut short
        f.truncate(shard.stat().st_size // 2)
    with pytest.warns(CorruptCheckpointWarning, match="step_00000006"):
        result = run_pretraining(_job(synthetic_data, tmp_path, "fallback", 8))
    assert result.metrics[-1]["resumed_from_step"] == 4
    steps = [m["step"] for m in result.metrics]
    assert steps[-4:] == [5, 6, 7, 8]
    final = run_dir / "step_00000008"
    audit = audit_checkpoint(final)
    assert audit.exact and audit.expected == 8 * 8, audit
    assert json.loads((final / "ledger.json").read_text())["intervals"] == [[0, 64]]
    # keep_checkpoints=3: step 2 pruned; the rewritten step 6 replaced the corrupt one.
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]
    assert verify_checkpoint(run_dir / "step_00000006") == ""
