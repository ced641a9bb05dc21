"""Exact resume on Ray Train with two CPU workers, for ZeRO-2 and ZeRO-3: a run whose
worker dies after step 4 restarts from the step-3 checkpoint (Ray Train's automatic
resume) and ends with the same losses and bit-identical weights as a run that was never
interrupted."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
from mamba_slm.platform.train.hooks import FailAtStep
from mamba_slm.platform.train.launcher import resolve_job, run_pretraining

pytestmark = [pytest.mark.ray, pytest.mark.slow]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")


def _run(data, out, name, stage, hooks=(), max_failures=0, gpu=False):
    t = TrainingConfig(max_steps=6, global_batch_size=8, micro_batch_size=2, warmup_steps=2, lr=3e-3,
                       checkpoint_every=3, zero_stage=stage, seed=7)
    run = RunConfig(name=name, num_workers=2, output_dir=str(out / name), storage_path=str(out / "storage"),
                    wandb=False, plot=False, max_failures=max_failures, use_gpu=gpu)
    return run_pretraining(resolve_job(t, DataConfig(path=str(data)), run, hooks=list(hooks)))


@pytest.mark.parametrize("stage,gpu", [(2, False), (3, False), pytest.param(2, True, marks=TWO_GPUS),
                                       pytest.param(3, True, marks=TWO_GPUS)])
def test_interrupted_run_resumes_exactly(ray_cluster, synthetic_data, tmp_path, stage, gpu):
    """On 2 GPUs (NCCL, bf16, the Triton kernels) the same run: checkpoints, the resume and
    the final model under NCCL. The kernels' atomic adds are not bit-reproducible, so
    there the losses and weights must agree closely instead of exactly."""
    base = _run(synthetic_data, tmp_path, f"z{stage}-full", stage, gpu=gpu)
    marker = tmp_path / "failed-once"
    resumed = _run(synthetic_data, tmp_path, f"z{stage}-interrupted", stage,
                   hooks=[FailAtStep(4, marker, rank=1)], max_failures=1, gpu=gpu)
    assert marker.is_file(), "the injected failure did not fire"
    assert resumed.last["resumed_from_step"] == 3 and resumed.last["step"] == 6
    records = [json.loads(x) for x in (tmp_path / f"z{stage}-interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records].count(4) >= 1 and records[-1]["step"] == 6
    full_losses = [m["loss"] for m in base.metrics]
    tol = dict(rtol=0, atol=2e-2) if gpu else dict(rtol=0, atol=0)
    torch.testing.assert_close([m["loss"] for m in resumed.metrics], full_losses, **tol,
                               msg="resumed losses differ")
    a = load_file(str(tmp_path / f"z{stage}-full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / f"z{stage}-interrupted" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=f"{name} differs after resume")
    assert full_losses[-1] < full_losses[0]
    ckpt = tmp_path / "storage" / f"z{stage}-interrupted" / "step_00000006"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert (ckpt / "model" / "model.safetensors").is_file()
