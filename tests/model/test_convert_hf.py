"""model/convert_hf.py: the HybridLM <-> transformers BambaForCausalLM mapping."""
from __future__ import annotations

import pytest
import torch

from mamba_slm.model import HybridLM, ModelConfig
from mamba_slm.model.convert_hf import (CONFIG_KEY, UnsupportedConversion, from_bamba_config,
                                        from_bamba_state_dict, to_bamba_config, to_bamba_state_dict)

ATOL = 1e-4  # fp32 CPU; measured ~2e-7 on these sizes


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=1000, **kw)


def randomised(cfg: ModelConfig) -> HybridLM:
    """Random weights everywhere, including the 1-D ones (norms, D, dt_bias) that start
    at constants, so a swapped or dropped parameter shows in the logits."""
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def bamba_from(model: HybridLM):
    from transformers import BambaConfig, BambaForCausalLM
    bamba = BambaForCausalLM(BambaConfig(**to_bamba_config(model.config))).eval()
    missing, unexpected = bamba.load_state_dict(to_bamba_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if model.config.tie_embeddings else set())
    return bamba


@pytest.mark.parametrize("kw", [
    dict(layer_pattern="AMMA"),
    dict(layer_pattern="MAMM", tie_embeddings=False, rope_theta=500.0),
    dict(layer_pattern="AMAM", rope_scaling={"type": "linear", "factor": 4.0}, mamba_conv_bias=False,
         mamba_proj_bias=True, norm_eps=1e-6),
])
def test_bamba_logits_match(kw):
    model = randomised(tiny(**kw))
    bamba = bamba_from(model)
    ids = torch.randint(0, 1000, (3, 77))  # 77: not a multiple of the chunk size (32)
    with torch.no_grad():
        ours, theirs = model(ids).logits, bamba(ids).logits
    assert theirs.shape == ours.shape == (3, 77, model.config.padded_vocab_size)
    assert (ours - theirs).abs().max().item() < ATOL


def test_round_trip_config_and_names():
    cfg = tiny(layer_pattern="AMMA", tie_embeddings=False)
    state = HybridLM(cfg).state_dict()
    hf = to_bamba_config(cfg)
    assert hf["attn_layer_indices"] == [0, 3] and hf["mamba_n_heads"] == cfg.mamba_n_heads
    assert hf["vocab_size"] == cfg.padded_vocab_size == 1024
    assert from_bamba_config(hf) == cfg
    renamed = to_bamba_state_dict(state, cfg)
    assert "model.layers.0.self_attn.q_proj.weight" in renamed and "model.layers.1.mamba.A_log" in renamed
    assert "model.final_layernorm.weight" in renamed
    back = from_bamba_state_dict(renamed, cfg)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    # A Bamba config written by someone else (no embedded ModelConfig) maps field by field.
    foreign = {k: v for k, v in hf.items() if k != CONFIG_KEY}
    mapped = from_bamba_config(foreign, vocab_size=1000)
    for field in ("layer_pattern", "hidden_size", "n_heads", "n_kv_heads", "mamba_head_dim", "mamba_d_state",
                  "mamba_chunk_size", "mlp_hidden_size", "padded_vocab_size", "vocab_size", "tie_embeddings"):
        assert getattr(mapped, field) == getattr(cfg, field), field


@pytest.mark.parametrize("kw, field", [
    (dict(rotary_fraction=0.25), "rotary_fraction"),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}), "rope_scaling"),
    (dict(attn_ratio=0.0), "layer_pattern='MMMM' has no attention layer"),  # Bamba's forward needs one
])
def test_refuses_what_bamba_cannot_express(kw, field):
    with pytest.raises(UnsupportedConversion, match=field):
        to_bamba_config(tiny(**kw))


@pytest.mark.parametrize("change, field", [
    ({"time_step_limit": [0.001, 0.1]}, "time_step_limit"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
])
def test_import_refuses_foreign_semantics(change, field):
    hf = {**to_bamba_config(tiny()), **change}
    with pytest.raises(UnsupportedConversion, match=field):
        from_bamba_config(hf)


def test_grouped_mamba_matches_bamba_logits():
    """n_groups > 1: the gated norm is per group in both models."""
    from mamba_slm.platform.evaluate.hf import build_bamba, max_logit_diff
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_name("tiny", vocab_size=512, mamba_n_groups=2, layer_pattern="MAMM")).eval()
    assert max_logit_diff(model, build_bamba(model)) < 1e-4
