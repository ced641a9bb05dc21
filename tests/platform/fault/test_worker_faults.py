"""Fault-injection tests 1 and 3 of issue 5 on a real Ray cluster (two CPU workers,
tiny preset, DeepSpeed ZeRO-2), against one uninterrupted run with the same seed:

1. SIGKILL a worker process at two random steps and at step 7, right after damaging the
   newest checkpoint: Ray Train restarts the worker group from the latest intact
   checkpoint each time; the final weights are bit-identical to the uninterrupted run
   (same data order by global sample index, same RNG, same reduction order on the same
   number of workers), and the ledger holds every sample once. The storage is a
   directory, so the workers write every checkpoint straight into it (nothing through
   the node's temp dir), past a torn one left there.
3. SIGTERM a worker: every worker finishes the step, a checkpoint is published within
   the grace period, the run ends cleanly; resubmitted, it continues from there and
   again ends bit-identical.
5. SIGKILL the job driver mid-run and run the same command again: it resumes from the
   latest checkpoint in storage and ends bit-identical.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from safetensors.torch import load_file

from mamba_slm.platform.fault.chaos import corrupt_newest
from mamba_slm.platform.fault.inject import SignalAtSteps, fired
from mamba_slm.platform.fault.integrity import checkpoint_order, checkpoints_newest_first, verify_checkpoint
from mamba_slm.platform.fault.ledger import audit_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS, BATCH = 8, 8  # as run_tiny (tests/platform/conftest.py)


@pytest.fixture
def _run(tiny_run):
    def run(data, out, name, hooks=(), max_failures=0, grace_s=30.0):
        return tiny_run(data, out, name, hooks, max_failures=max_failures, preemption_grace_s=grace_s)
    return run


def _assert_same_weights(expected, model_dir):
    got = load_file(str(model_dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs from the uninterrupted run"


def _assert_ledger_exact(run_dir):
    final = run_dir / f"step_{STEPS:08d}"
    assert verify_checkpoint(final) == ""
    audit = audit_checkpoint(final)
    assert audit.expected == STEPS * BATCH and audit.trained == STEPS * BATCH
    assert audit.lost == 0 and audit.repeated == 0, audit


class RecordTempDirs:
    """Hook: from its first call on, every directory this worker makes through `tempfile`
    is appended to `log` (one line per directory)."""

    def __init__(self, log: Path):
        self.log = str(log)

    def on_step_end(self, state, rank: int) -> None:
        if getattr(tempfile.mkdtemp, "recorded_in", None) == self.log:
            return
        real, log = tempfile.mkdtemp, self.log

        def mkdtemp(*args, **kwargs):
            path = real(*args, **kwargs)
            with open(log, "a") as f:
                f.write(f"rank {rank}: {path}\n")
            return path

        mkdtemp.recorded_in = log
        tempfile.mkdtemp = mkdtemp


class CorruptNewestAtStep:
    """Hook: worker `rank` damages the newest checkpoint in `run_dir` after `step`, once
    across restarts (`marker` records it)."""

    def __init__(self, step: int, run_dir: Path, marker: Path, rank: int):
        self.step, self.run_dir, self.marker, self.rank = step, str(run_dir), str(marker), rank

    def on_step_end(self, state, rank: int) -> None:
        if rank != self.rank or state.step != self.step or Path(self.marker).exists():
            return
        Path(self.marker).write_text(corrupt_newest(Path(self.run_dir), random.Random(0)))


# The hooks travel to the workers pickled; they cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_sigkill_at_three_steps_one_after_damaging_the_newest_checkpoint(baseline, synthetic_data, tmp_path,
                                                                         tiny_run):
    """Also: no worker makes a temp dir for a checkpoint; a torn temporary directory of
    step 4 (a writer killed mid-save) is never resumed from and is cleared when step 4 is
    written; Ray Train's keep_checkpoints prunes the published ones. Step 6 is damaged
    before the kill at step 7: the restart falls back to step 4, step 6 is written again
    as step_00000006-r1 (a name of its own: Ray had registered step_00000006, and pruning
    that record deleted the rewritten, live directory), and Ray's pruning later removes
    the damaged one."""
    seed = int(os.environ.get("FAULT_SEED", random.randrange(10**6)))
    kill_steps = sorted(random.Random(seed).sample(range(1, STEPS - 1), 2)) + [STEPS - 1]
    print(f"FAULT_SEED={seed}: SIGKILL rank 1 after steps {kill_steps}, step 6 damaged before the last")
    run_dir, log, markers = tmp_path / "storage" / "killed", tmp_path / "tempdirs.log", tmp_path / "kills"
    torn = run_dir / ".tmp-step_00000004-999999"
    (torn / ".rank1" / "ds").mkdir(parents=True)
    (torn / ".rank1" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"torn")
    damaged = tmp_path / "damaged"
    result = tiny_run(synthetic_data, tmp_path, "killed", max_failures=3, keep_checkpoints=2,
                      hooks=[RecordTempDirs(log), CorruptNewestAtStep(STEPS - 1, run_dir, damaged, rank=1),
                             SignalAtSteps(kill_steps, markers, rank=1, sig=signal.SIGKILL)])
    assert fired(markers) == [f"SIGKILL-step{s}" for s in kill_steps], "not every kill fired"
    assert damaged.read_text().startswith("corrupted step_00000006/")
    assert result.last["step"] == STEPS
    assert not log.exists(), f"checkpoints went through temp dirs:\n{log.read_text()}"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["step_00000006-r1", "step_00000008"]
    final = run_dir / f"step_{STEPS:08d}"
    assert result.checkpoint == str(final)
    for name in ("rng_rank0.pt", "rng_rank1.pt", "integrity_rank0.json", "integrity_rank1.json",
                 "model/model.safetensors"):
        assert (final / name).is_file(), name
    assert verify_checkpoint(run_dir / "step_00000006-r1") == ""
    _assert_same_weights(baseline, tmp_path / "killed" / "model")
    _assert_ledger_exact(run_dir)


def test_sigterm_checkpoints_within_grace_then_resumes(baseline, synthetic_data, tmp_path, _run):
    markers, grace = tmp_path / "terms", 20.0
    hook = SignalAtSteps([3], markers, rank=1, sig=signal.SIGTERM)
    first = _run(synthetic_data, tmp_path, "preempted", hooks=[hook], grace_s=grace)
    assert first.last["preempted"].startswith("SIGTERM") or first.last["preempted"]
    stopped_at = first.last["step"]
    assert stopped_at in (3, 4), "the run must stop at the step after the notice"
    ckpt = tmp_path / "storage" / "preempted" / f"step_{stopped_at:08d}"
    assert verify_checkpoint(ckpt) == ""
    latency = (ckpt / "integrity_rank0.json").stat().st_mtime - (markers / "SIGTERM-step3").stat().st_mtime
    print(f"SIGTERM -> checkpoint published in {latency:.2f} s (grace {grace:.0f} s)")
    assert 0 < latency < grace
    assert not (tmp_path / "preempted" / "model").exists(), "a preempted run is not a finished model"
    second = _run(synthetic_data, tmp_path, "preempted", hooks=[hook])
    assert second.last["resumed_from_step"] == stopped_at and second.last["step"] == STEPS
    _assert_same_weights(baseline, tmp_path / "preempted" / "model")
    _assert_ledger_exact(tmp_path / "storage" / "preempted")


def test_killed_driver_resubmitted_resumes_from_latest_checkpoint(baseline, synthetic_data, tmp_path,
                                                                 ray_cluster, repo_root):
    """Test 5: SIGKILL the driver (`python jobs/pretrain.py`, as `ray job submit` runs it)
    once a checkpoint is in storage; the same command again resumes from the latest one."""
    cmd = [sys.executable, "jobs/pretrain.py", "--name", "driver", "--data-path", str(synthetic_data),
           "--output-dir", str(tmp_path / "driver"), "--storage-path", str(tmp_path / "storage"),
           "--max-steps", str(STEPS), "--global-batch-size", str(BATCH), "--micro-batch-size", "2",
           "--warmup-steps", "2", "--lr", "3e-3", "--checkpoint-every", "2", "--zero-stage", "2",
           "--seed", "11", "--num-workers", "2", "--no-wandb", "--no-plot"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    driver = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "storage" / "driver" / "step_00000002"
    deadline = time.monotonic() + 240
    # Killed as soon as the first checkpoint is sealed: the next steps are under way. The
    # whole 8-step run takes ~2 s once started, so a later kill can miss it.
    while not (first / "integrity_rank1.json").is_file():
        assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_at = checkpoints_newest_first(tmp_path / "storage" / "driver")[0].name
    assert checkpoint_order(killed_at)[0] < STEPS, "the driver was killed too late to test anything"
    again = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "driver" / "metrics.jsonl").read_text().splitlines()]
    resumed = records[-1]["resumed_from_step"]
    print(f"driver killed with {killed_at} in storage; resubmission resumed from step {resumed}")
    assert resumed is not None and resumed >= 2 and records[-1]["step"] == STEPS
    _assert_same_weights(baseline, tmp_path / "driver" / "model")
    _assert_ledger_exact(tmp_path / "storage" / "driver")
