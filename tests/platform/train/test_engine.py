"""build_engine on CPU ranks: DeepSpeed's communication starts without a JIT build."""
from __future__ import annotations

from pathlib import Path

import torch


def _engine_in(rank, world, ext_dir):
    import os

    os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir  # read when an op is built
    from mamba_slm.model import ModelConfig
    from mamba_slm.platform.train.config import TrainingConfig
    from mamba_slm.platform.train.engine import build_engine

    engine, _ = build_engine(ModelConfig.from_name("tiny", vocab_size=256),
                             TrainingConfig(zero_stage=2, global_batch_size=2 * world, micro_batch_size=2), world,
                             use_gpu=False)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
    loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
    engine.backward(loss)
    engine.step()
    return sorted(p.name for p in Path(ext_dir).glob("*"))


def test_engine_starts_without_building_deepspeeds_shm_op(spawn_ranks, tmp_path):
    """DeepSpeed's CPU comm start-up JIT-built its shared-memory all-reduce op (~32 s on a
    fresh machine, used by its inference all-reduce only): build_engine skips it, and
    two ranks still train a step."""
    results = spawn_ranks(_engine_in, 2, str(tmp_path / "ext"))
    assert results == {0: [], 1: []}, results  # nothing built into the fresh extensions dir
