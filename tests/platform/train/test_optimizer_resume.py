"""A resumed run keeps its own optimizer settings (platform/train/checkpoint.py,
`restore_optimizer_settings`): real DeepSpeed engines on CPU ranks (no Ray), one saving a
checkpoint with one set of AdamW settings and gradient clip, the other resuming it with
another set, on the same or on another number of ranks (the universal-checkpoint path
of an elastic resize)."""
from __future__ import annotations

from pathlib import Path

import pytest

SAVED = dict(weight_decay=0.1, beta1=0.9, beta2=0.95, adam_eps=1e-8, grad_clip=1.0)
NOW = dict(weight_decay=0.2, beta1=0.8, beta2=0.99, adam_eps=1e-6, grad_clip=0.5)


def _engine(world: int, stage: int, settings: dict):
    from mamba_slm.model import ModelConfig
    from mamba_slm.platform.train.config import TrainingConfig
    from mamba_slm.platform.train.engine import build_engine

    cfg = TrainingConfig(zero_stage=stage, global_batch_size=2 * world, micro_batch_size=2, seed=3, **settings)
    model_cfg = ModelConfig.from_name("tiny", vocab_size=256)
    engine, _ = build_engine(model_cfg, cfg, world, use_gpu=False)
    return engine, cfg, model_cfg


def _train_and_save(rank, world, path, stage):
    import torch

    from mamba_slm.platform.train.checkpoint import save_checkpoint
    from mamba_slm.platform.train.config import DataConfig, RunConfig
    from mamba_slm.platform.train.state import JobSpec, TrainState

    engine, cfg, model_cfg = _engine(world, stage, SAVED)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).loss)
    engine.step()
    job = JobSpec(cfg, DataConfig(path="/data"), RunConfig(name="saved", num_workers=world), model_cfg)
    save_checkpoint(engine, TrainState(step=1), job.to_dict(), Path(path), rank)


def _resume(rank, world, path, stage):
    from mamba_slm.platform.train.checkpoint import load_checkpoint

    engine, _, _ = _engine(world, stage, NOW)
    state = load_checkpoint(engine, Path(path), rank, world, (0, rank))
    adam = engine.optimizer.optimizer.state  # the moments came from the checkpoint
    return {"step": state.step, "adam_steps": sorted({float(s["step"]) for s in adam.values()}),
            "groups": {g["name"]: (g["weight_decay"], tuple(g["betas"]), g["eps"])
                       for g in engine.optimizer.param_groups},
            "clip": (engine.gradient_clipping(), engine.optimizer.clip_grad)}


@pytest.mark.parametrize("stage,saved_by,resumed_on", [(3, 2, 1), (2, 1, 1)],
                         ids=["zero3-elastic-2-to-1", "zero2-same-size"])
def test_a_resumed_run_keeps_its_own_optimizer_settings(spawn_ranks, tmp_path, stage, saved_by, resumed_on):
    """ZeRO-3 resumed on another number of ranks (DeepSpeed's universal checkpoint): its
    loader copied the first group's settings into every group, so the no-decay group
    (norms, biases, A_log, D, dt_bias) got weight decay. Any resume: the checkpoint's AdamW
    settings and (ZeRO-2) gradient clip replaced the ones this run was started with."""
    ckpt = tmp_path / "step_00000001"
    spawn_ranks(_train_and_save, saved_by, str(ckpt), stage)
    got = spawn_ranks(_resume, resumed_on, str(ckpt), stage)[0]
    assert got["step"] == 1 and got["adam_steps"] == [1.0], got  # the optimizer state was loaded
    betas, eps = (NOW["beta1"], NOW["beta2"]), NOW["adam_eps"]
    assert got["groups"] == {"decay": (NOW["weight_decay"], betas, eps), "no_decay": (0.0, betas, eps)}, got
    assert got["clip"] == (NOW["grad_clip"], NOW["grad_clip"]), got
