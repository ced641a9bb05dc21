"""Checkpoint integrity and the sample ledger: units, then test 4 of issue 5 on a real
(in-process) training run: a corrupt newest checkpoint is skipped with a warning and
the run resumes from the previous good one."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mamba_slm.platform.fault.integrity import (CorruptCheckpointWarning, checkpoint_order,
                                                checkpoints_newest_first, latest_good_checkpoint,
                                                prune_checkpoints, publish_atomically, seal_checkpoint,
                                                temporary_dir_for, unused_checkpoint_name, verify_checkpoint)
from mamba_slm.platform.fault.ledger import SampleLedger, audit_checkpoint, to_intervals
from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.launcher import resolve_job, run_pretraining


def _fake_checkpoint(run_dir, step, world=1, name=None):
    final = run_dir / (name or f"step_{step:08d}")
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


def test_a_step_checkpointed_again_gets_a_new_name_that_sorts_after_the_old_ones(tmp_path):
    """step_N, then step_N-r1, -r2, ...: ordered by (step, revision) everywhere (as text
    -r10 < -r2, and step_N-r1 < step_N/ as paths), one past the newest revision even where
    pruning removed step_N itself; names that are not checkpoints are ignored."""
    assert unused_checkpoint_name(6, []) == "step_00000006"
    assert unused_checkpoint_name(6, ["step_00000004", "step_00000006"]) == "step_00000006-r1"
    assert unused_checkpoint_name(6, ["step_00000006-r1", ".unregistered-step_00000006-r4"]) == "step_00000006-r2"
    assert checkpoint_order("step_00000006-r10") == (6, 10) and checkpoint_order("step_00000006") == (6, 0)
    assert checkpoint_order("step_latest") is None and checkpoint_order(".tmp-step_00000006-123") is None
    for name in ("step_00000006", "step_00000007", "step_latest"):  # unsealed (torn)
        (tmp_path / name).mkdir()
    for step, name in ((5, "step_00000005"), (6, "step_00000006-r2"), (6, "step_00000006-r10")):
        _fake_checkpoint(tmp_path, step, name=name)
    assert unused_checkpoint_name(6, [p.name for p in tmp_path.iterdir()]) == "step_00000006-r11"
    assert [p.name for p in checkpoints_newest_first(tmp_path)] == [
        "step_00000007", "step_00000006-r10", "step_00000006-r2", "step_00000006", "step_00000005"]
    with pytest.warns(CorruptCheckpointWarning, match="step_00000007"):  # unsealed: skipped
        assert latest_good_checkpoint(tmp_path) == tmp_path / "step_00000006-r10"
    with pytest.warns(CorruptCheckpointWarning, match="step_00000007"):  # the one given, then older ones
        assert latest_good_checkpoint(tmp_path, newest=tmp_path / "step_00000007") == tmp_path / "step_00000006-r10"
    (tmp_path / "step_00000006-r10" / "integrity_rank0.json").unlink()
    with pytest.warns(CorruptCheckpointWarning) as caught:  # r2 is older than r10, newer than step_00000006
        assert latest_good_checkpoint(tmp_path, newest=tmp_path / "step_00000006-r10") == tmp_path / "step_00000006-r2"
    assert len(caught) == 1
    removed = prune_checkpoints(tmp_path, keep=2)  # 7 and r10 are damaged: r2, the newest good one, stays
    assert sorted(p.name for p in removed) == ["step_00000005", "step_00000006"]


def test_publish_never_replaces_a_published_checkpoint(tmp_path):
    """A checkpoint is published once under a new name; moving an existing one aside left
    the step absent between two renames, and a `.old-*` dir behind after a kill there."""
    published = _fake_checkpoint(tmp_path, 4)
    tmp = temporary_dir_for(published)
    tmp.mkdir()
    with pytest.raises(FileExistsError, match="already published"):
        publish_atomically(tmp, published)
    assert verify_checkpoint(published) == "" and tmp.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "step_00000004"]


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
    over = SampleLedger([[0, 120]]).audit(100)  # weights hold 20 samples the resumed loader feeds again
    assert (over.lost, over.repeated, over.beyond, over.exact) == (0, 0, 20, False)
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
    # Step 6 done again is written as step_00000006-r1: the damaged step 6 is neither
    # replaced nor lost, it stays for inspection until keep_checkpoints=3 prunes it
    # (steps 2 and 4 went first).
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000006", "step_00000006-r1", "step_00000008"]
    assert verify_checkpoint(run_dir / "step_00000006-r1") == ""
    assert "bytes" in verify_checkpoint(newest)
    assert not list(run_dir.glob(".*-step_*"))
