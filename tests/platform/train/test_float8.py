"""Float8 training (`--float8`, torchao): which linears are swapped, that the loss and
gradients stay close to the high-precision ones, and that DeepSpeed ZeRO-3 trains with it
on two gloo ranks (the float8 matmuls run emulated on the CPU)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchao")

from mamba_slm.model import HybridLM, ModelConfig  # noqa: E402
from mamba_slm.platform.train.float8 import apply_float8, check_float8_device  # noqa: E402


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_swaps_the_blocks_linears_only_and_keeps_names_and_markers():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_name("tiny"))
    keys = sorted(model.state_dict())
    swapped = apply_float8(model)
    kinds = {name: type(mod).__name__ for name, mod in model.named_modules()}
    assert swapped and all(kinds[n] == "Float8Linear" for n in swapped)
    assert kinds["lm_head"] == "LMHead" and kinds["embed_tokens"] == "Embedding"
    # tiny's Mamba-2 in_proj is 64 -> 296 wide: not a multiple of 16, left in high precision
    mamba = next(i for i, k in enumerate(model.config.layer_pattern) if k == "M")
    assert kinds[f"layers.{mamba}.mixer.in_proj"] == "Linear"
    assert f"layers.{mamba}.mixer.out_proj" in swapped and f"layers.{mamba}.feed_forward.down_proj" in swapped
    attn = model.config.layer_pattern.index("A")
    assert {f"layers.{attn}.mixer.{p}_proj" for p in "qkvo"} <= set(swapped)
    assert all(getattr(model.get_submodule(n), "_is_residual_proj", False)
               for n in swapped if n.endswith(("down_proj", "out_proj", "o_proj")))
    assert sorted(model.state_dict()) == keys  # checkpoints and exports do not change


def test_loss_and_gradients_close_to_high_precision():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    ref = HybridLM(cfg)
    model = copy.deepcopy(ref)
    apply_float8(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = _loss_and_grads(ref, ids)
    loss_f8, grads_f8 = _loss_and_grads(model, ids)
    assert loss_f8 == pytest.approx(loss_ref, rel=2e-3)
    assert loss_f8 != loss_ref  # the swapped matmuls really ran in float8
    assert set(grads_f8) == set(grads_ref)
    for name, g in grads_ref.items():  # e5m2 gradients: ~10% relative error, same direction
        cos = torch.nn.functional.cosine_similarity(grads_f8[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.98, (name, cos.item())


def test_refuses_a_gpu_without_float8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"8\.9\+.*A100.*8\.0"):
        check_float8_device(torch.device("cuda", 0))


def test_pretrain_refuses_float8_without_torchao(monkeypatch, tmp_path):
    import importlib.util

    from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
    from mamba_slm.platform.train.launcher import resolve_job

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match=r"--float8 needs torchao.*mamba-slm\[float8\]"):
        resolve_job(TrainingConfig(float8=True), DataConfig(path=str(tmp_path)), RunConfig())


def test_float8_refusals_name_the_way_out(tmp_path):
    from mamba_slm.platform.train.config import DataConfig, RunConfig, TrainingConfig
    from mamba_slm.platform.train.launcher import resolve_job
    from mamba_slm.platform.train.synthetic import write_synthetic_dataset

    with pytest.raises(ValueError, match="zero_stage=3 needs activation_checkpointing"):
        TrainingConfig(float8=True, zero_stage=3)
    TrainingConfig(float8=True, zero_stage=3, activation_checkpointing=True)
    write_synthetic_dataset(tmp_path / "d", seq_len=60, vocab_size=256, train_rows=16, val_rows=2,
                            shards=1, row_group=8)
    data = DataConfig(path=str(tmp_path / "d"))
    with pytest.raises(ValueError, match="--float8 needs --use-gpu"):
        resolve_job(TrainingConfig(float8=True), data, RunConfig())
    with pytest.raises(ValueError, match=r"micro_batch_size x seq_len = 2 x 60 to be a multiple of 16"):
        resolve_job(TrainingConfig(float8=True, micro_batch_size=2, global_batch_size=4), data,
                    RunConfig(use_gpu=True))
    resolve_job(TrainingConfig(float8=True, micro_batch_size=4, global_batch_size=8), data, RunConfig(use_gpu=True))


def _zero_worker(rank: int, world: int, stage: int) -> dict:
    from mamba_slm.platform.train.config import TrainingConfig
    from mamba_slm.platform.train.engine import build_engine

    ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(rank))
    model_cfg = ModelConfig.from_name("tiny", vocab_size=256)
    out = {}
    for float8 in (False, True):
        cfg = TrainingConfig(zero_stage=stage, global_batch_size=2 * world, micro_batch_size=2,
                             seed=3, lr=1e-2, float8=float8, activation_checkpointing=True)
        engine, _ = build_engine(model_cfg, cfg, world, use_gpu=False)
        kinds = {type(m).__name__ for m in engine.module.modules()}
        losses = []
        for _ in range(3):
            loss = engine(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[float8] = (losses, "Float8Linear" in kinds)
    return out


def test_deepspeed_zero3_trains_in_float8(spawn_ranks):
    """ZeRO-3, the stage that partitions the weights the float8 linears cast (ZeRO-2 leaves
    whole parameters in place, as the single-process tests above)."""
    for rank, res in spawn_ranks(_zero_worker, 2, 3).items():
        (losses_hp, swapped_hp), (losses_f8, swapped_f8) = res[False], res[True]
        assert swapped_f8 and not swapped_hp
        assert losses_f8[-1] < losses_f8[0], (rank, losses_f8)  # it learns
        assert losses_f8 == pytest.approx(losses_hp, rel=1e-2), (rank, losses_hp, losses_f8)
        assert losses_f8 != losses_hp
