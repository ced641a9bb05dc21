"""ZeRO-3 trains with the fused cross-entropy: the loss runs inside lm_head's forward, where
DeepSpeed has gathered the partitioned head weight. On two gloo ranks, its loss and full
gradients equal those of the full-logits path (`return_logits=True`), tied and untied."""
from __future__ import annotations

import pytest
import torch

CHECKED = ("lm_head.weight", "embed_tokens.weight", "layers.0.mixer.in_proj.weight", "final_norm.weight")


def _worker(rank: int, world: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from mamba_slm.model import ModelConfig
    from mamba_slm.platform.train.config import TrainingConfig
    from mamba_slm.platform.train.engine import build_engine

    ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(rank))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100
    cfg = TrainingConfig(zero_stage=3, global_batch_size=2 * world, micro_batch_size=2, seed=3)
    result = {}
    for tie in (False, True):
        model_cfg = ModelConfig.from_name("tiny", vocab_size=256, tie_embeddings=tie)
        for fused in (True, False):
            engine, _ = build_engine(model_cfg, cfg, world, use_gpu=False)
            assert hasattr(engine.module.lm_head.weight, "ds_id"), "the head is not partitioned"
            loss = engine(ids[:, :-1], labels=labels, return_logits=not fused).loss
            engine.backward(loss)
            grads = {n: safe_get_full_grad(p).numpy().copy() for n, p in engine.module.named_parameters()
                     if n in CHECKED}
            result[tie, fused] = (loss.item(), grads)
    return result


def test_zero3_fused_loss_matches_full_logits(spawn_ranks):
    for rank, res in spawn_ranks(_worker, 2).items():
        for tie in (False, True):
            (loss_f, grads_f), (loss_p, grads_p) = res[tie, True], res[tie, False]
            assert loss_f == pytest.approx(loss_p, rel=1e-5), (rank, tie)
            assert set(grads_f) == set(CHECKED) - ({"lm_head.weight"} if tie else set())
            for name in grads_f:
                assert abs(grads_f[name]).sum() > 0, name
                torch.testing.assert_close(torch.from_numpy(grads_f[name]), torch.from_numpy(grads_p[name]),
                                           rtol=1e-4, atol=1e-6, msg=f"{name} (tied: {tie})")
