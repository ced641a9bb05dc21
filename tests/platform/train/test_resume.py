"""Exact resume on Ray Train with two CPU workers, for ZeRO-2 and ZeRO-3: a run whose
worker dies after step 5 restarts from the step-4 checkpoint (Ray Train's automatic
resume) and ends with the same losses and bit-identical weights as a run that was never
interrupted (tests/platform/conftest.py; the ZeRO-2 one is the fault tests' baseline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mamba_slm.platform.train.hooks import FailAtStep
from mamba_slm.platform.train.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
STEPS, FAIL_AT = 8, 5  # run_tiny checkpoints every 2 steps


@pytest.mark.parametrize("stage,gpu", [(2, False), (3, False), pytest.param(2, True, marks=TWO_GPUS),
                                       pytest.param(3, True, marks=TWO_GPUS)])
def test_interrupted_run_resumes_exactly(synthetic_data, tmp_path, tiny_run, uninterrupted, stage, gpu):
    """On 2 GPUs (NCCL, bf16, the Triton kernels) the same run: checkpoints, the resume and
    the final model under NCCL. The kernels' atomic adds are not bit-reproducible, so
    there the losses and weights must agree closely instead of exactly."""
    full = uninterrupted(zero_stage=stage, use_gpu=gpu)
    marker = tmp_path / "failed-once"
    resumed = tiny_run(synthetic_data, tmp_path, f"z{stage}-interrupted", [FailAtStep(FAIL_AT, marker, rank=1)],
                       zero_stage=stage, use_gpu=gpu, max_failures=1)
    assert marker.is_file(), "the injected failure did not fire"
    assert resumed.last["resumed_from_step"] == FAIL_AT - 1 and resumed.last["step"] == STEPS
    records = [json.loads(x) for x in (tmp_path / f"z{stage}-interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records].count(FAIL_AT) >= 1 and records[-1]["step"] == STEPS
    # each worker group's first record says where its start-up went; the restarted one loaded
    firsts = [r for r in records if "startup_s" in r]
    assert [r["step"] for r in firsts] == [1, FAIL_AT], firsts
    assert firsts[0]["checkpoint_load_s"] is None and firsts[1]["checkpoint_load_s"] > 0
    assert all(r["startup_s"] > r["engine_build_s"] > 0 for r in firsts)
    full_losses = [m["loss"] for m in read_metrics(full)]
    tol = dict(rtol=0, atol=2e-2) if gpu else dict(rtol=0, atol=0)
    torch.testing.assert_close([m["loss"] for m in resumed.metrics], full_losses, **tol,
                               msg="resumed losses differ")
    # the val loss (every 4 steps, both workers, a collective under ZeRO-3) resumes alike
    val = [(m["step"], m["val_loss"]) for m in resumed.metrics if "val_loss" in m]
    assert [s for s, _ in val] == [4, 8]
    torch.testing.assert_close([v for _, v in val], [m["val_loss"] for m in read_metrics(full) if "val_loss" in m],
                               **tol, msg="resumed val losses differ")
    if not gpu:  # and it is the step-8 model's loss on the first 2 global batches of val, both halves
        from mamba_slm.platform.train.checkpoint import load_model
        from mamba_slm.platform.train.data import PackedSampleReader

        model, reader = load_model(full / "model"), PackedSampleReader(synthetic_data, "val", seed=11)
        with torch.no_grad():
            want = [model(b.input_ids, seq_idx=b.seq_idx, labels=b.labels, return_logits=False).loss.item()
                    for b in (reader.batch(np.arange(i, i + 2)) for i in range(0, 16, 2))]
        assert val[-1][1] == pytest.approx(sum(want) / len(want), abs=1e-5)
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / f"z{stage}-interrupted" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=f"{name} differs after resume")
    assert full_losses[-1] < full_losses[0]
    ckpt = tmp_path / "storage" / f"z{stage}-interrupted" / f"step_{STEPS:08d}"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert (ckpt / "model" / "model.safetensors").is_file()
